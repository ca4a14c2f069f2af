# expect: failed
# error: KeyboardInterrupt
raise KeyboardInterrupt
