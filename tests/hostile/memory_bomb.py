# expect: memory
# Allocates 50 MB blocks until RLIMIT_AS says no: MemoryError, classified "memory".
blocks = []
while True:
    blocks.append(bytearray(50 * 1024 * 1024))
