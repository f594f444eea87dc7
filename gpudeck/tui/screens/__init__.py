"""The screens over the main views: a job in detail, the submit form, confirmations, help, and
what to do when no coordinator is found."""
