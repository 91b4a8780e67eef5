"""The batch worker beside an inference engine (`troughfill worker`)."""
