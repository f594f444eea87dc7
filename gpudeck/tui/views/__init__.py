"""The dashboard's main views, one per tab (nodes, jobs, traffic, people)."""
