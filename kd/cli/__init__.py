"""`kd`: user tools around the build (check, show, diff, audit, status, cache, pipeline). Never stage execution."""
