"""The money side: inventory, the bill engine, bills and their writers, the report, the aggregator.

Everything here turns stored samples (read through ``telemetry.store.dataset``) into unit-hours,
energy and money per window, pool, tenant and job (SPEC §3–4).
"""
