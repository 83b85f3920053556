"""cryptogen/he."""
