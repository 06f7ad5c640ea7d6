"""Admin API handlers by resource: one mixin of AdminApi per resource (admin/handlers.py)."""
