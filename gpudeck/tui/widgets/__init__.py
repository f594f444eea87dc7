"""The dashboard's widgets: parts the views and screens are built from."""
