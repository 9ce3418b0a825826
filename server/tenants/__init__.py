"""Tenants: who a key belongs to, their fair-share weight and their limits."""

from .table import OPEN_TENANT, Tenant, TenantFileError, TenantLimits, TenantTable, hash_key, load_tenants

__all__ = ["OPEN_TENANT", "Tenant", "TenantFileError", "TenantLimits", "TenantTable", "hash_key", "load_tenants"]
