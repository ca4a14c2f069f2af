# expect: output_limit
while True:
    print("x" * 10_000)
