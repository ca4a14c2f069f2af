# expect: memory
# One huge allocation.
data = " " * (10**12)
