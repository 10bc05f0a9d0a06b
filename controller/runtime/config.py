"""Where kvmctl finds etcd: flags, then environment, then the config file.

The config file (`~/.config/kvmctl/config.yaml`, or `KVMCTL_CONFIG`) is kubeconfig-like:

    current-context: lab
    contexts:
      lab:
        endpoints: [10.0.0.1:2379, 10.0.0.2:2379, 10.0.0.3:2379]
        prefix: /kvmctl
        cacert: /etc/kvmctl/pki/ca.crt     # TLS: etcd's CA (https:// without it: the system's CAs)
        cert: /etc/kvmctl/pki/admin.crt    # mutual TLS: our client certificate
        key: /etc/kvmctl/pki/admin.key
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.runtime.etcd_transport import TlsFiles
from controller.runtime.store import DEFAULT_PREFIX, DEFAULT_TIMEOUT, Store

DEFAULT_ENDPOINT = "127.0.0.1:2379"


class ConfigError(ValueError):
    pass


@dataclass
class Settings:
    endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINT])
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    tls: TlsFiles | None = None

    def store(self) -> Store:
        return Store(self.endpoints, prefix=self.prefix, timeout=self.timeout, tls=self.tls)


def config_path() -> Path:
    explicit = os.environ.get("KVMCTL_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kvmctl/config.yaml"


def _context(path: Path, name: str | None) -> dict[str, Any]:
    if not path.is_file():
        if os.environ.get("KVMCTL_CONFIG"):
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping")
    contexts = document.get("contexts") or {}
    chosen = name or document.get("current-context")
    if chosen is None:
        return {}
    if chosen not in contexts:
        raise ConfigError(f"{path}: no context named {chosen!r}")
    context = contexts[chosen]
    if not isinstance(context, dict):
        raise ConfigError(f"{path}: context {chosen!r} must be a mapping")
    return context


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def resolve(
    etcd: str | None = None,
    prefix: str | None = None,
    context: str | None = None,
    timeout: float | None = None,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Settings:
    """Settings from flags (given here), else environment, else the config file's context."""
    from_file = _context(config_path(), context)
    settings = Settings()
    endpoints = etcd or os.environ.get("KVMCTL_ETCD")
    if endpoints:
        settings.endpoints = _split(endpoints)
    elif from_file.get("endpoints"):
        settings.endpoints = [str(endpoint) for endpoint in from_file["endpoints"]]
    settings.prefix = (
        prefix or os.environ.get("KVMCTL_PREFIX") or from_file.get("prefix", DEFAULT_PREFIX)
    )
    if timeout is not None:
        settings.timeout = timeout
    elif "timeout" in from_file:
        settings.timeout = float(from_file["timeout"])
    tls_files = {
        name: flag or os.environ.get(f"KVMCTL_{name.upper()}") or from_file.get(name)
        for name, flag in (("cacert", cacert), ("cert", cert), ("key", key))
    }
    if any(tls_files.values()):  # TLS; without a CA file, to a certificate the system trusts
        paths = {name: Path(path) if path else None for name, path in tls_files.items()}
        settings.tls = TlsFiles(ca=paths["cacert"], cert=paths["cert"], key=paths["key"])
    if not settings.prefix.startswith("/") or ".." in settings.prefix.split("/"):
        raise ConfigError(f"prefix {settings.prefix!r} must be an absolute key path without '..'")
    return settings
