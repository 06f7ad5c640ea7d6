"""A child process for the privileged tests: one connect() or sendto(), reported as JSON.

python probe.py tcp|udp|udpconnect IP PORT [--thread] [--fork]
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import threading

COMM = b"cdl-probe"


def act(action: str, ip: str, port: int) -> dict[str, int]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_STREAM if action == "tcp" else socket.SOCK_DGRAM
    err = 0
    with socket.socket(family, kind) as s:
        s.settimeout(2)
        try:
            if action == "udp":
                s.sendto(b"probe", (ip, port))
            else:
                s.connect((ip, port))
        except OSError as e:
            err = e.errno or -1
    return {"errno": err, "tgid": os.getpid(), "tid": threading.get_native_id()}


def main(argv: list[str]) -> None:
    # A name of our own, so the tests can tell the guard's comm field is this process's.
    ctypes.CDLL(None).prctl(15, COMM, 0, 0, 0)  # PR_SET_NAME
    action, ip, port = argv[0], argv[1], int(argv[2])
    if "--fork" in argv:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps(act(action, ip, port)).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        result = json.loads(os.read(r, 4096))
    elif "--thread" in argv:
        box: list[dict[str, int]] = []
        t = threading.Thread(target=lambda: box.append(act(action, ip, port)))
        t.start()
        t.join()
        result = box[0]
    else:
        result = act(action, ip, port)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
