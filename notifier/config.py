"""notifier.yaml -> typed, validated settings. Secrets come only from the environment.

A bad file raises `ConfigError` whose message names the key path and the problem, e.g.
``routes[0].channels[1]: unknown channel 'fax' (configured: email, sms)``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from redis.connection import parse_url

from notifier.errors import ConfigError
from notifier.redis_conn import parse_sentinel_url

CHANNEL_NAMES = ("sms", "email", "push")
LOCALES = ("en", "zh-CN")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION = 3650 * 86400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """'500ms', '1s', '10m', '2h', '7d' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '10s', got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past any float: YAML and JSON both allow one
            seconds = math.inf
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like '500ms', '10s', '5m', '2h', '7d', got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if math.isnan(seconds):
        raise ValueError("a duration must be a number of seconds, got NaN")
    if seconds > MAX_DURATION:  # Redis refuses such a TTL: every write using it would fail
        raise ValueError(f"a duration must be at most {MAX_DURATION // 86400:.0f}d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def mask_phone(phone: str) -> str:
    """+8613800138000 -> +86138****8000: enough to recognise, not to harvest."""
    return phone[:6] + "****" + phone[-4:] if len(phone) > 10 else "****"


_SMS_CAPABLE = (phonenumbers.PhoneNumberType.MOBILE,
                phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)


def _valid(candidate: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(number) else None


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _readings(text: str, region: str) -> tuple[phonenumbers.PhoneNumber | None,
                                               phonenumbers.PhoneNumber | None]:
    """A number written without '+': (its reading in `region`, its reading as country code +
    number), each None when not a valid number."""
    return _valid(text, region), _valid(f"+{text}", region)


def _digits(raw: str) -> str:
    return re.sub(r"[\s\-()]", "", str(raw))


@functools.lru_cache(maxsize=4096)  # parsed on every SMS send and receipt: a few numbers, often
def normalise_phone(raw: str, default_region: str = "CN") -> str:
    """Any of '+8613800138000', '8613800138000', '13800138000' -> '+8613800138000' (E.164).

    Read as Aliyun writes numbers (and pushes them back): mainland ones bare or after '86',
    every other one as country code + number without '+'. So without a '+', a number that is a
    mobile in the default region is that (a bare 150..., 166..., 180... mobile is also a valid
    +1 number, but Dysmsapi's SendSms does not serve North America); otherwise it is country
    code + number ('79161234567' is a Russian mobile, not a Nanchang landline); a landline of
    the region comes last.
    """
    text = _digits(raw)
    if text.startswith("+"):
        number = _valid(text, default_region)
        if number is not None:
            return _e164(number)
    else:
        national, international = _readings(text, default_region)
        if national is not None and phonenumbers.number_type(national) in _SMS_CAPABLE:
            return _e164(national)
        for number in (international, national):
            if number is not None:
                return _e164(number)
    # Masked: this message ends up in logs and in answers to pushes of other people's numbers.
    raise ValueError(f"not a valid phone number ({mask_phone(text)})")


def e164_or_raw(raw: str) -> str:
    """A pushed sender as E.164 when it reads as a phone number, else as given (a short code, a
    name): kept to be shown (masked) and rejected, not dropped."""
    try:
        return normalise_phone(raw)
    except ValueError:
        return raw


def config_phone(raw: str, default_region: str = "CN") -> str:
    """A recipient's number as written in the config: as `normalise_phone` reads it, except that
    one written without '+' that is a mobile number both in the region and as country code +
    number is refused: a person wrote it, and guessing could page a stranger abroad."""
    text = _digits(raw)
    if not text.startswith("+"):
        readings = [n for n in _readings(text, default_region)
                    if n is not None and phonenumbers.number_type(n) in _SMS_CAPABLE]
        if len(readings) == 2 and _e164(readings[0]) != _e164(readings[1]):
            national, international = readings
            regions = " or ".join(f"+{n.country_code}… ({phonenumbers.region_code_for_number(n)})"
                                  for n in (national, international))
            raise ValueError(f"ambiguous without its country code: write it as {regions}")
    return normalise_phone(raw, default_region)


# A phone number field of any model: whatever form it comes in, it is stored as E.164.
E164 = Annotated[str, AfterValidator(normalise_phone)]


def each_once(value: list[str]) -> list[str]:
    """A list of channels or addresses, refused when it names one twice: each listing is a
    delivery of its own, so the message would go there twice."""
    twice = sorted({item for item in value if value.count(item) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
    return value


Once = Annotated[list[str], AfterValidator(each_once)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """A token bucket: `rate` tokens refill every `per`; at most `burst` banked (by default
    `rate`, and never less than one message)."""

    rate: float = Field(gt=0)
    # Over no time at all there is no rate: a bucket with `per` 0 refuses to be built, which
    # failed every send of the channel at run time.
    per: Duration = Field(default=1.0, gt=0)
    # A bucket that banks less than one token can never send a message (each costs one).
    burst: float | None = Field(default=None, ge=1)

    @property
    def capacity(self) -> float:
        # "rate: 0.5, per: 1s" means one message every two seconds, so it banks one, not half.
        return self.burst if self.burst is not None else max(self.rate, 1.0)

    @property
    def refill_per_second(self) -> float:
        return self.rate / self.per


class RetryPolicy(_Strict):
    max_attempts: int = Field(default=5, ge=1, le=50)
    base_delay: Duration = 1.0
    max_delay: Duration = 60.0
    jitter: float = Field(default=0.5, ge=0, le=1)  # +/- this fraction of the delay


class BreakerPolicy(_Strict):
    fail_max: int = Field(default=5, ge=1)
    reset_timeout: Duration = 30.0
    half_open_trials: int = Field(default=1, ge=1)


class AliyunSmsProvider(_Strict):
    provider: Literal["aliyun"]
    name: str = "aliyun"
    endpoint: str = "dysmsapi.aliyuncs.com"
    protocol: Literal["https", "http"] = "https"
    region_id: str = "cn-hangzhou"
    sign_name: str
    templates: dict[str, str] = Field(min_length=1)  # event kind -> TemplateCode
    # Names of the env variables holding this account's key (two accounts => two pairs).
    access_key_id_env: str = "ALIBABA_CLOUD_ACCESS_KEY_ID"
    access_key_secret_env: str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET"  # noqa: S105 - a variable name
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 10.0
    # Longest value Aliyun accepts for one template variable.
    param_max_chars: int = Field(default=35, ge=1)

    def template_kind(self, kind: str) -> str:
        """The kind whose TemplateCode a message of `kind` goes out with (AliyunSms)."""
        return kind if self.templates.get(kind) else "alert"

    @field_validator("templates")
    @classmethod
    def _has_alert(cls, value: dict[str, str]) -> dict[str, str]:
        # Every kind without a template of its own is sent with 'alert' (AliyunSms.template_for):
        # without it, each firing alert's SMS failed at send time (NoTemplate).
        if not value.get("alert"):
            raise ValueError(f"no 'alert' template (the kind of a firing alert, and the one every "
                             f"kind without its own uses); has: {', '.join(sorted(value))}")
        return value


class SmtpProvider(_Strict):
    provider: Literal["smtp"]
    name: str = "smtp"
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    tls: Literal["none", "starttls", "tls"] = "none"
    sender: str
    username: str | None = None
    password_env: str = "NOTIFIER_SMTP_PASSWORD"  # noqa: S105 - a variable name
    timeout: Duration = 10.0
    validate_certs: bool = True


class FcmProvider(_Strict):
    provider: Literal["fcm"]
    name: str = "fcm"
    project_id: str
    endpoint: str = "https://fcm.googleapis.com"
    credentials_file: str
    timeout: Duration = 10.0


class SandboxProvider(_Strict):
    """Writes messages to a Redis outbox instead of sending them (`notifier outbox`)."""

    provider: Literal["sandbox"]
    name: str = "sandbox"
    # SMS only: push an SmsReport to this URL after each send, as Aliyun would.
    report_url: str | None = None


ProviderConfig = Annotated[
    AliyunSmsProvider | SmtpProvider | FcmProvider | SandboxProvider,
    Field(discriminator="provider"),
]

_PROVIDERS_BY_CHANNEL: dict[str, tuple[str, ...]] = {
    "sms": ("aliyun", "sandbox"),
    "email": ("smtp", "sandbox"),
    "push": ("fcm", "sandbox"),
}
_CHANNEL_POLICY_KEYS = ("rate_limit", "recipient_limits", "retry", "breaker", "providers",
                        "max_defer")


ALIYUN_RECIPIENT_LIMITS = (RateLimit(rate=1, per=60, burst=2), RateLimit(rate=50, per=86400, burst=50))


class ChannelConfig(_Strict):
    """One channel. The flat form of DESIGN.md (provider keys beside the policy keys) is the
    primary provider; `providers:` lists more, tried in order before the channel fails."""

    providers: list[ProviderConfig] = Field(min_length=1)
    rate_limit: RateLimit | None = None
    # Per recipient address on this channel, every bucket must have a token.
    recipient_limits: list[RateLimit] = Field(default_factory=list)
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    # A recipient limit that would hold a message longer than this sends it down the fallback
    # chain instead (a spent day budget must not delay a page by hours).
    max_defer: Duration = 600.0

    @model_validator(mode="after")
    def _carrier_defaults(self) -> ChannelConfig:
        # Aliyun counts notification SMS per number: 50 a day for one signature + template.
        # Without limits of its own, an Aliyun SMS channel stays inside that, and sends one
        # number at most 2 a minute (the rest are merged into a digest).
        if "recipient_limits" not in self.model_fields_set and any(
                p.provider == "aliyun" for p in self.providers):
            object.__setattr__(self, "recipient_limits", list(ALIYUN_RECIPIENT_LIMITS))
        return self

    @model_validator(mode="before")
    @classmethod
    def _flat_primary(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "provider" not in data:
            return data
        primary = {k: v for k, v in data.items() if k not in _CHANNEL_POLICY_KEYS}
        rest = {k: v for k, v in data.items() if k in _CHANNEL_POLICY_KEYS}
        rest["providers"] = [primary, *rest.get("providers", [])]
        return rest


class Recipient(_Strict):
    phone: Annotated[str, AfterValidator(config_phone)] | None = None
    email: str | None = None
    push_tokens: Once = Field(default_factory=list)
    locale: Literal["en", "zh-CN"] | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
            raise ValueError(f"not an email address: {value!r}")
        return value


class Route(_Strict):
    match: dict[str, str] = Field(default_factory=dict)  # label == value (and `receiver`)
    match_re: dict[str, str] = Field(default_factory=dict)  # label ~ anchored regex
    to: list[str] = Field(min_length=1)
    channels: Once = Field(min_length=1)
    fallback: Once = Field(default_factory=list)

    @field_validator("match_re")
    @classmethod
    def _regexes_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for label, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{label}: bad regex {pattern!r}: {exc}") from exc
        return value


class DrillSettings(_Strict):
    reply_code_ttl: Duration = 72 * 3600.0
    default_deadline: Duration = 300.0
    escalation_rounds: int = Field(default=2, ge=0)
    # Targets of the drill report (seconds).
    target_notify: Duration = 30.0
    target_switch: Duration = 60.0
    target_reply: Duration = 300.0


REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")


def check_redis_url(url: str) -> str:
    """A URL redis_conn.connect can use, read as it will be. The error never quotes the URL or
    the parser's message: either may hold (part of) a password."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"expected a {', '.join(s + '://' for s in REDIS_SCHEMES)} URL")
    try:
        if scheme == "sentinel":
            parse_sentinel_url(url)
        else:
            parse_url(url)  # type: ignore[no-untyped-call]
    except (ValueError, ConfigError):
        raise ValueError("cannot be read: check the host and port, and percent-encode any "
                         "':', '/', '@' or '#' in the password") from None
    return url


class Settings(_Strict):
    redis_url: Annotated[str, AfterValidator(check_redis_url)] = "redis://127.0.0.1:6379/0"
    # With redis_url sentinel://host:26379;sentinel://host2:26379: the monitored master's name.
    redis_sentinel_master: str | None = None
    locale: Literal["en", "zh-CN"] = "en"
    # Key lifetimes, in whole seconds (or milliseconds, the dedup window) as Redis takes them:
    # one that rounds to 0 is EXPIRE 0 (the transaction deleted as it is accepted) or SET ... EX 0
    # (an error: the accept script fails, every webhook or keyed event answered 503).
    retention: Duration = Field(default=7 * 86400.0, ge=1)
    dedup_window: Duration = Field(default=600.0, ge=0.001)
    idempotency_ttl: Duration = Field(default=86400.0, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    public_url: str = "http://127.0.0.1:9095"  # where providers' callbacks reach the API
    scheduler_interval: Duration = 0.05  # timer resolution: paced sends fire one by one
    reconcile_after: Duration = 600.0  # ask QuerySendDetails about SMS without a receipt
    # A delivery that has not moved for this long lost its task with a worker: re-queue it.
    reaper_after: Duration = 60.0
    claim_lease: Duration = 120.0  # longer than any send may take (task_time_limit)
    channels: dict[str, ChannelConfig] = Field(min_length=1)
    recipients: dict[str, Recipient] = Field(default_factory=dict)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    routes: list[Route] = Field(min_length=1)
    drills: DrillSettings = DrillSettings()

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        problems: list[str] = []
        if self.redis_url.startswith("sentinel://") and not self.redis_sentinel_master:
            problems.append("redis_sentinel_master: required with a sentinel:// redis_url "
                            "(the name the sentinels monitor)")
        for name in ("dedup_window", "idempotency_ttl"):
            # A repeat inside the window is answered with the first transaction, which must
            # still exist: else the sender is told "suppressed" pointing at nothing, and the
            # repeat's count lands on a key without expiry.
            if getattr(self, name) > self.retention:
                problems.append(f"{name}: longer than retention ({getattr(self, name):g}s > "
                                f"{self.retention:g}s); lower it or keep transactions longer")
        configured = sorted(self.channels)
        for name, channel in self.channels.items():
            if name not in CHANNEL_NAMES:
                problems.append(f"channels.{name}: unknown channel (known: {', '.join(CHANNEL_NAMES)})")
                continue
            seen: set[str] = set()
            for i, provider in enumerate(channel.providers):
                if provider.provider not in _PROVIDERS_BY_CHANNEL[name]:
                    allowed = ", ".join(_PROVIDERS_BY_CHANNEL[name])
                    problems.append(
                        f"channels.{name}.providers[{i}].provider: {provider.provider!r} "
                        f"cannot carry {name} (use one of: {allowed})"
                    )
                if provider.name in seen:
                    problems.append(
                        f"channels.{name}.providers[{i}].name: duplicate provider name "
                        f"{provider.name!r}; give each provider a unique `name`"
                    )
                seen.add(provider.name)
        for group, members in self.groups.items():
            if group in self.recipients:
                problems.append(f"groups.{group}: a recipient has the same name")
            for j, member in enumerate(members):
                if member not in self.recipients:
                    problems.append(f"groups.{group}[{j}]: unknown recipient {member!r}")
        for i, route in enumerate(self.routes):
            for j, target in enumerate(route.to):
                if target not in self.recipients and target not in self.groups:
                    problems.append(f"routes[{i}].to[{j}]: unknown recipient or group {target!r}")
            for key in ("channels", "fallback"):
                for j, channel_name in enumerate(getattr(route, key)):
                    if channel_name not in self.channels:
                        problems.append(
                            f"routes[{i}].{key}[{j}]: unknown channel {channel_name!r} "
                            f"(configured: {', '.join(configured)})"
                        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def provider_names(self, channel: str) -> list[str]:
        return [p.name for p in self.channels[channel].providers]


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in ("aliyun", "smtp", "fcm", "sandbox"):
                continue  # discriminator branch, not a key the user wrote
            else:
                path += f".{part}" if path else str(part)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def settings_from_mapping(data: Any, source: str = "config") -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    url = os.environ.get("NOTIFIER_REDIS_URL")
    if not url:
        return settings
    try:
        check_redis_url(url)
    except ValueError as exc:
        raise ConfigError(f"NOTIFIER_REDIS_URL: {exc}") from None
    return settings.model_copy(update={"redis_url": url})


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("NOTIFIER_CONFIG") or "notifier.yaml")


def load_settings(path: str | Path | None = None) -> Settings:
    file = Path(path) if path is not None else config_path()
    return settings_from_mapping(read_config_file(file), str(file))


def check_claim_lease(settings: Settings, task_time_limit: float) -> None:
    """ConfigError when a claim can lapse while its send still runs: the reaper re-queues the
    delivery, another worker takes the claim over and, on a channel without a look-up (email,
    push), sends it again. A step, its send included, ends by Celery's time limit, which comes
    from the worker's environment (NOTIFIER_TASK_TIME_LIMIT), not from this file."""
    if settings.claim_lease < task_time_limit:
        raise ConfigError(
            f"claim_lease: shorter than the worker's task time limit ({settings.claim_lease:g}s "
            f"< {task_time_limit:g}s, NOTIFIER_TASK_TIME_LIMIT): a send still running could be "
            f"taken over and sent again; raise claim_lease")


def read_config_file(file: Path) -> Any:
    """The YAML document in `file`; ConfigError naming the file for one that cannot be read,
    is not UTF-8 or is not YAML."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # e.g. saved as GBK by a zh-CN editor
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the line: that line may be a
    redis_url with its password."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark, started = exc.problem_mark, exc.context_mark
        problem = f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
        if exc.context and started is not None:
            return f"{exc.context} (line {started.line + 1}): {problem}"
        return f"{exc.context}: {problem}" if exc.context else problem
    return type(exc).__name__
