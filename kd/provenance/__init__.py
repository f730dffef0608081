"""Provenance tools: record lineage, diffs across revisions, audits, dataset cards and forecasts."""
