"""Admin API: the /admin/v1 routes, framework-free."""
