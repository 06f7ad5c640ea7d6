"""Certificates: Candela's interception CA (authority) and the trust bundles built around it (bundle)."""
