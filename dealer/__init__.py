"""The optional third party: a dealer of correlated randomness run by someone trusted by both sides, on its own machine."""
