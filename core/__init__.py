"""Configuration and process infrastructure: settings, dealership profile, resources (pool,
Redis), embedded servers, metrics, PII masking.
"""
