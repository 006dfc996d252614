"""Contracts and plumbing shared by the ingest, train and attack jobs."""
