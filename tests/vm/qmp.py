#!/usr/bin/env python3
"""Minimal QMP client for the VM tests.

    qmp.py SOCKET 'COMMAND-JSON' ['COMMAND-JSON'...]

Connects to a QEMU monitor socket (-qmp unix:SOCKET,server=on,wait=off), reads the greeting,
negotiates capabilities, runs each command in turn (e.g. '{"execute": "query-migrate"}') and
prints the "return" value of each as one line of JSON. Asynchronous events are skipped.
Exit status: 0 if every command succeeded, 1 on a QMP error (printed on stderr), 2 on a
connection problem.
"""
import json
import socket
import sys


def main():
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path, commands = sys.argv[1], sys.argv[2:]
    try:
        commands = [json.loads(c) for c in commands]
    except json.JSONDecodeError as e:
        print(f"qmp.py: bad command JSON: {e}", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
    except OSError as e:
        print(f"qmp.py: {path}: {e}", file=sys.stderr)
        return 2
    stream = sock.makefile("rwb")

    def reply():
        """The next non-event message (None if the monitor closed the connection)."""
        while True:
            line = stream.readline()
            if not line:
                return None
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(cmd):
        stream.write(json.dumps(cmd).encode() + b"\n")
        stream.flush()
        return reply()

    try:
        greeting = reply()
        if greeting is None or "QMP" not in greeting:
            print(f"qmp.py: unexpected greeting {greeting!r}", file=sys.stderr)
            return 2
        if "return" not in (execute({"execute": "qmp_capabilities"}) or {}):
            print("qmp.py: qmp_capabilities failed", file=sys.stderr)
            return 2
        for cmd in commands:
            msg = execute(cmd)
            if msg is None:
                # `quit` may close the socket before (or instead of) answering.
                if cmd.get("execute") == "quit":
                    print("{}")
                    continue
                print("qmp.py: the monitor closed the connection", file=sys.stderr)
                return 2
            if "error" in msg:
                err = msg["error"]
                print(f"qmp.py: {cmd.get('execute')}: {err.get('class')}: {err.get('desc')}",
                      file=sys.stderr)
                return 1
            print(json.dumps(msg.get("return")))
    except (OSError, ValueError) as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 2
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
