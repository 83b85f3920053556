"""The model owner's server program: the TLS gateway (API keys, sessions, the scheduler) that runs on the Ray cluster's head."""
