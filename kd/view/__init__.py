"""`kd view`: a read-only local web app over a kd project."""
