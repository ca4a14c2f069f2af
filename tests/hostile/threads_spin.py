# expect: timeout
import threading


def spin():
    while True:
        pass


threads = [threading.Thread(target=spin) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
