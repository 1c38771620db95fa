"""Email over SMTP (aiosmtplib): one multipart/alternative message per send.

No SMTP client, socket or event loop exists before `send()` runs: Celery forks its workers
after importing this module and constructing channels, and a connection (or a loop) made
in the parent would be shared by every child. Each send opens its own connection; it is
correct on any loop and costs one handshake, which alert volumes can afford.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from datetime import UTC, datetime
from email.errors import MessageError
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

import aiosmtplib

from notifier.channels.base import Channel, ChannelContext, ChannelLimits, send_budget
from notifier.channels.smtp_errors import classify
from notifier.config import SmtpProvider
from notifier.errors import DeliveryError, PermanentError
from notifier.models import ErrorClass, Outgoing, Receipt

# Characters allowed in the left part of a Message-ID (RFC 5322 dot-atom-text, minus a few
# that confuse some mail clients).
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

# socket.getfqdn() may block on a reverse DNS lookup; aiosmtplib would run it for every
# connection, so it is looked up once per process, off the event loop.
_local_hostname: str | None = None

# After the message was accepted: how long its QUIT and the socket's close may take. Short and
# fixed, so a send's worst case (send_budget + these) stays under Celery's soft time limit.
QUIT_SECONDS = 2.0
CLOSE_SECONDS = 1.0


async def _helo_name() -> str:
    global _local_hostname  # noqa: PLW0603 - a per-process cache, set once
    if _local_hostname is None:
        name = await asyncio.to_thread(socket.getfqdn)
        _local_hostname = name if name and "." in name else "localhost.localdomain"
    return _local_hostname


async def _socket_closed(sock: Any, limit: float = CLOSE_SECONDS) -> None:
    """Return once the connection's socket is really closed (a TLS close needs a few more
    loop turns after close()), so a caller that ends its loop right after send() leaks
    nothing. Bounded: a peer that never answers our close_notify costs at most `limit`."""
    if sock is None:
        return
    deadline = asyncio.get_running_loop().time() + limit
    while sock.fileno() != -1 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


class _SMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, noting when the DATA stage began: from then on the message may be
    on the server whatever goes wrong (smtp_errors.AFTER_DATA)."""

    data_sent = False

    async def data(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        self.data_sent = True
        return await super().data(*args, **kwargs)


class SmtpEmail(Channel):
    channel = "email"
    # Subjects stay readable in a mail list at ~200 characters; bodies have no SMTP limit
    # worth hitting, the cap only stops a runaway template.
    limits = ChannelLimits(address="email", body_maxlen=200_000, title_maxlen=200)

    def __init__(self, config: SmtpProvider, context: ChannelContext) -> None:
        super().__init__(config.name)
        self._config = config
        self._password: str | None = None
        if config.username is not None:
            self._password = context.env.get(config.password_env)
        sender = parseaddr(config.sender)[1] or config.sender
        self._envelope_from = sender
        self._domain = sender.rpartition("@")[2] or "localhost"

    def __repr__(self) -> str:
        c = self._config
        user = f", user={c.username!r}" if c.username else ""
        return f"SmtpEmail({c.name!r}, {c.host}:{c.port}, tls={c.tls}{user})"

    def message_id(self, message: Outgoing) -> str:
        """Stable per delivery: a retry after an unclear failure carries the same Message-ID,
        so mail clients that de-duplicate on it show the alert once."""
        left = _MSGID_UNSAFE.sub("-", message.delivery_id) or "delivery"
        return f"<notifier.{left}@{self._domain}>"

    def build(self, message: Outgoing) -> EmailMessage:
        """The email exactly as it goes on the wire (minus transport encoding)."""
        rendered = message.rendered
        email = EmailMessage()
        # The subject is event text: it goes in already in its wire form (RFC 2047 words, all of
        # it), so none of it is read as header syntax. Set as text, the email package decodes
        # whatever looks like an encoded word in it and writes the decoded CR LF raw: a label
        # '=?utf-8?q?x=0D=0AReply-To:_...?=' added headers (Python before 3.11.10, 3.12.5).
        email.set_raw("Subject", Header(rendered.subject, "utf-8", header_name="Subject").encode())
        email["From"] = self._config.sender
        # As text: Address() refuses a non-ASCII mailbox (RFC 6531), which the config accepts and
        # aiosmtplib sends with SMTPUTF8; CR or LF in it is still refused (ValueError).
        email["To"] = message.address
        email["Date"] = format_datetime(datetime.now(UTC))
        email["Message-ID"] = self.message_id(message)
        email["X-Notifier-Transaction-Id"] = message.transaction_id
        email["X-Notifier-Delivery-Id"] = message.delivery_id
        # RFC 3834: vacation responders and list servers must not answer machine mail.
        email["Auto-Submitted"] = "auto-generated"
        email.set_content(rendered.text)
        if rendered.html is not None:
            email.add_alternative(rendered.html, subtype="html")
        return email

    async def send(self, message: Outgoing) -> Receipt:
        try:
            email = self.build(message)
        except (ValueError, TypeError, IndexError, MessageError) as exc:
            # A header with CR/LF or an address the email package cannot parse.
            raise PermanentError("INVALID_MESSAGE", str(exc)) from None
        config = self._config
        if config.username is not None and not self._password:
            raise PermanentError(
                "NO_PASSWORD",
                f"SMTP username is set but ${config.password_env} is empty",
                error_class=ErrorClass.ACCOUNT,
            )
        client = _SMTP(
            hostname=config.host,
            port=config.port,
            use_tls=config.tls == "tls",
            # STARTTLS is issued by _deliver, never guessed: "none" must not upgrade on its
            # own and "starttls" must fail rather than fall back to plain text.
            start_tls=False,
            validate_certs=config.validate_certs,
            timeout=config.timeout,
            local_hostname=await _helo_name(),
        )
        try:
            await self._deliver(client, email, message.address)
        except Exception as exc:
            raise self._scrub(classify(exc, data_sent=client.data_sent)) from None
        return Receipt(provider_message_id=str(email["Message-ID"]))

    @property
    def send_budget(self) -> float:
        """The deadline for the whole session: `timeout` for each round trip it makes, so a
        server answering every step in time is never cut off (after DATA that would be maybe
        sent, and a second email): greeting, EHLO, MAIL, RCPT, DATA and the final dot; the TLS
        handshake; STARTTLS with its EHLO again; AUTH (LOGIN: up to three)."""
        config = self._config
        trips = 6 + (config.tls != "none") + 2 * (config.tls == "starttls")
        trips += 3 * (config.username is not None)
        return send_budget(config.timeout, trips)

    async def _deliver(self, client: _SMTP, email: EmailMessage, to: str) -> None:
        config = self._config
        raw_socket: Any = None
        try:
            async with asyncio.timeout(self.send_budget):
                await client.connect()
                raw_socket = client.get_transport_info("socket")
                if config.tls == "starttls":
                    await client.starttls()
                if config.username is not None:
                    await client.login(config.username, self._password or "")
                await client.send_message(email, sender=self._envelope_from, recipients=[to])
            # Accepted. The goodbye gets its own budget, outside the one above, so a slow or
            # rude QUIT can never turn a delivered message into a failure (and a duplicate).
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):  # TimeoutError too
                async with asyncio.timeout(min(config.timeout, QUIT_SECONDS)):
                    await client.quit()
        finally:
            client.close()
            await _socket_closed(raw_socket)

    def _scrub(self, error: DeliveryError) -> DeliveryError:
        """The password must not reach a log."""
        return error.redacted(self._password) if self._password else error
