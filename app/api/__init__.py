"""HTTP routes: thin functions that call the services and shape responses."""
