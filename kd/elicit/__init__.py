"""Knowledge elicitation (survey §3.1): each method turns inputs into teacher requests and records."""
