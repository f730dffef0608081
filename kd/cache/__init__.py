"""The request cache (content-addressed answers) and its sharing through a DVC remote."""
