"""A private SMTP server for the email tests, on aiosmtpd.

Listens on 127.0.0.1 on a free port and prints "ready PORT" once it accepts
connections. Each accepted message is written to OUT/NNNN.json with its
envelope, whether the session was encrypted, the authenticated user, the
message bytes (as Latin-1 text), and what Python's own MIME parser reads in
it: the header names, the decoded Subject, From, To and Message-ID, the
top-level content type and each decoded text part. It stops when its standard input closes, so it never outlives
the test that started it.

    smtp_sink.py --out DIR [--port PORT] [--starttls CERT KEY | --smtps CERT KEY]
                 [--auth USER:PASSWORD] [--rcpt-reply "550 ..."]
                 [--data-reply "451 ..."]
"""

import argparse
import asyncio
import email
import email.policy
import itertools
import json
import os
import ssl
import sys
import threading

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Sink:
    def __init__(self, out, rcpt_reply, data_reply):
        self.out = out
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.count = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        auth = session.auth_data
        data = envelope.original_content
        msg = email.message_from_bytes(data, policy=email.policy.default)
        parts = {}
        for part in msg.walk():
            if part.get_content_maintype() == "text":
                parts[part.get_content_type()] = part.get_content()
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": server.transport.get_extra_info("ssl_object") is not None,
            "auth_user": auth.login.decode() if isinstance(auth, LoginPassword) else None,
            "data": data.decode("latin-1"),
            "header_names": list(msg.keys()),
            "subject": str(msg["Subject"]),
            "from": str(msg["From"]),
            "to": str(msg["To"]),
            "message_id": str(msg["Message-ID"]),
            "content_type": msg.get_content_type(),
            "parts": parts,
            "defects": [repr(d) for d in msg.defects],
        }
        path = os.path.join(self.out, "%04d.json" % next(self.count))
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 Message accepted"


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--smtps", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--auth")
    p.add_argument("--rcpt-reply")
    p.add_argument("--data-reply")
    args = p.parse_args()

    handler = Sink(args.out, args.rcpt_reply, args.data_reply)
    kwargs = {"hostname": "sink.test"}
    if args.starttls:
        kwargs["tls_context"] = tls_context(*args.starttls)
        kwargs["require_starttls"] = True
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            if ok:
                return AuthResult(success=True, auth_data=auth_data)
            # Not handled: aiosmtpd answers 535 itself.
            return AuthResult(success=False, handled=False)

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        # AUTH only over TLS, as a real submission server would have it.
        kwargs["auth_require_tls"] = True
    smtps = tls_context(*args.smtps) if args.smtps else None

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, loop=loop, **kwargs), "127.0.0.1", args.port, ssl=smtps
        )
    )
    port = server.sockets[0].getsockname()[1]

    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready %d" % port, flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
