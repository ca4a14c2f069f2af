# expect: failed
# error: OSError
files = []
while True:
    files.append(open("/dev/null"))
