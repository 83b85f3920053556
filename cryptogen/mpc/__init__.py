"""cryptogen/mpc."""
