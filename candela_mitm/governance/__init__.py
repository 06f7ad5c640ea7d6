"""Governance: the decisions made on every request, in request order; pure, over the state ports."""
