"""``fededge provision``: a federation file in, startup kits out (after NVIDIA FLARE's).

Output layout (``OUT``)::

    ca/        the federation CA (ca.key never leaves this directory), the kit-signing
               certificate and key (provision.crt/.key) and revoked.json
    broker/    mosquitto.conf, passwd, acl, crl.pem, the broker's TLS certificate, start
               script, unit
    server/    server.toml, password, client certificates and keys (server, server@deploy,
               server@lock), ca.crt, the code-signing certificate and key for
               `fededge deploy`, start script, unit
    <device>/  client.toml, password, client certificates and keys (the device, unless it is
               agent-only, and <device>@agent), ca.crt, start script, unit (``fededge
               client``, or ``fededge agent`` for an agent-only device)

The broker takes a client certificate's CN as the MQTT user name, so every user has its own
certificate, and ``--revoke`` puts a device's certificates on the revocation list (crl.pem).

A device trains (role ``client``) unless its profile cannot (``can_train = false``) or its
``[[devices]]`` table says ``role = "agent"``: an agent-only device trains nothing, gets only the
edge agent's broker user and runs the model of a training device (``model_from``, or the
largest trained student its profile's budgets allow), which ``fededge deploy`` sends it.

Every kit has a ``manifest.json`` signed by the kit-signing certificate (``manifest.sig``), and
``OUT/manifest.json`` covers all files. Provisioning is
incremental: existing CA, passwords, keys and certificates are kept, so adding a device changes
no one else's credentials; ``--revoke`` removes a device from the password file and ACL and
deletes its kit. A device still listed after it was revoked is skipped (with a note), never
re-issued credentials: give a replacement a new id.

The work is done by the builders below, one concern each, which ``provisioner.Provisioner``
runs in this order over a staging copy of OUT that replaces OUT only when all are done (on an
error OUT is left as it was); ``ProvisionContext`` is what they share:

    Revocations   who is out (``ca/revoked.json``, ``--revoke``); removes their kits
    Planner       roles, the dataset split, students, settings, every party's ``Kit``
    Certificates  the CA (kept, or created), every MQTT user's certificate, the signers
    PartyKits     the server's and each device's kit file, password, start script and unit
    BrokerKit     Mosquitto's password file, ACL, CRL and mosquitto.conf, start script, unit
    Manifests     each kit's ``manifest.json`` and OUT's, each signed
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fededge import __version__
from fededge.config import ConfigError, FederationConfig
from fededge.federation.strategies import UnknownStrategyError, strategy_pair
from fededge.files import private_dir, write_file, write_secret
from fededge.kits import mosquitto as mq
from fededge.kits import pki
from fededge.kits.fedfile import PRIVACY_KEYS, DeviceSpec, FederationSpec, load_federation_file
from fededge.kits.kit import (
    CA_FILE,
    CERT_FILE,
    CLIENT_FILE,
    CLIENT_ROLE,
    DATASET_FILE,
    DEPLOY_CERT_FILE,
    DEPLOY_KEY_FILE,
    KEY_FILE,
    PASSWORD_FILE,
    ROLES,
    STATE_DIR,
    ZOO_FILE,
    BrokerAccess,
    DatasetRef,
    Kit,
    MeasuredStudent,
    load_kit,
    login_files,
    party_roles,
)
from fededge.kits.manifest import verify_manifest, write_manifest
from fededge.kits.provisioner import Builder, Context, Provisioner, ProvisionError
from fededge.kits.render import render, when
from fededge.learn.aggregate import UnknownAggregatorError
from fededge.learn.arch import Measure
from fededge.learn.data import DataError, FederatedSplit, load_dataset, split_federated
from fededge.learn.picking import DEFAULT_BATCH_SIZE, inference_exceeds, pick_student
from fededge.learn.zoo import zoo_for
from fededge.profiles import DeviceProfile, ProfileError, get_profile
from fededge.wire.topics import AGENT_ROLE, DEPLOY_ROLE, SERVER_ID, role_user

CA_DIR, BROKER_DIR = "ca", "broker"
SIGNER_CERT, SIGNER_KEY = "provision.crt", "provision.key"  # in ca/: signs kit manifests
WHEEL = f"fededge-{__version__}-py3-none-any.whl"
"""What `make wheel` builds (dist/) and what kits' start scripts and units tell to install."""
CA_KEY, REVOKED_FILE = "ca.key", "revoked.json"
LOOPBACK_NAMES = ["localhost", "127.0.0.1"]
CLIENT_AUTH, SERVER_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING

ZooMeasurer = Callable[[Path, tuple[int, ...], int], dict[str, Measure]]
"""Checks and measures a zoo file's students for the federation's inputs and registers them
for picking (``learn.userzoo.load_user_zoo``; the CLI passes it). It needs torch, which
provisioning itself does without: without a measurer, a federation file with a zoo is refused."""


@dataclass(frozen=True)
class PartyPlan:
    """One device as provisioned."""

    id: str
    profile: str
    student: str
    status: str              # "new" or "kept" (credentials)
    role: str = CLIENT_ROLE  # or AGENT_ROLE: runs the model of ``model_from``, trains nothing
    model_from: str | None = None
    note: str | None = None  # e.g. an agent-only device's model beyond its profile's budgets


@dataclass(frozen=True)
class ProvisionResult:
    out: Path
    config: FederationConfig
    devices: list[PartyPlan]
    revoked: list[str]       # revoked by this run
    skipped: list[str]       # listed in the federation file but revoked earlier
    ca_fingerprint: str = "" # SHA-256 of the CA certificate: `verify-kit` prints it too


@dataclass(frozen=True)
class FederationPlan:
    """What the federation file comes to: the settings every party gets and each one's kit."""

    config: FederationConfig
    dataset_path: Path | None  # the .npz every kit that needs it ships, None: built in
    kits: list[Kit]            # the server's first, then each active device's (below ctx.root)
    agents: list[str]          # the agent-only devices among them
    devices: list[PartyPlan]   # what `fededge provision` reports per device


@dataclass(kw_only=True)
class ProvisionContext(Context):
    """What the builders share; each field is set by the builder named beside it."""

    spec: FederationSpec
    revoke: list[str]                                        # this run's --revoke
    measure_zoo: ZooMeasurer | None = None                   # for spec.zoo (needs torch)
    revoked: dict[str, dict] = field(default_factory=dict)   # Revocations: all, with serials
    plan: FederationPlan = field(init=False, repr=False)     # Planner
    ca: pki.Identity | None = None                           # Certificates (None: no CA yet)
    signer: pki.Identity | None = None                       # Certificates: signs manifests
    passwords: dict[str, str] = field(default_factory=dict)  # PartyKits: party -> broker password


class Revocations(Builder):
    """Who is out: ``ca/revoked.json`` and this run's ``--revoke``. First in the list: it
    records them and removes their kits before any kit is written, and its finalize, the
    last, checks that no revoked device kept a kit, a broker user or an ACL block."""

    def initialize(self, ctx: ProvisionContext) -> None:
        ctx.revoked = _revocations(ctx)

    def build(self, ctx: ProvisionContext) -> None:
        write_file(private_dir(ctx.root / CA_DIR) / REVOKED_FILE,
                   json.dumps(ctx.revoked, indent=2, sort_keys=True) + "\n")
        for device in ctx.revoked:
            if (ctx.root / device / CLIENT_FILE).is_file():  # a device kit, never ca/, server/
                shutil.rmtree(ctx.root / device)

    def finalize(self, ctx: ProvisionContext) -> None:
        users = mq.parse_passwd((ctx.root / BROKER_DIR / mq.PASSWD_NAME).read_text())
        acl = (ctx.root / BROKER_DIR / mq.ACL_NAME).read_text().splitlines()
        listed = set(pki.revoked_serials((ctx.root / BROKER_DIR / mq.CRL_NAME).read_bytes()))
        for device in ctx.revoked:
            left = [what for what, there in (
                ("a kit", (ctx.root / device).exists()),
                ("a broker user", {device, role_user(device, AGENT_ROLE)} & set(users)),
                ("an ACL block", {f"user {device}", f"user {role_user(device, AGENT_ROLE)}"}
                 & set(acl)),
                ("a certificate missing from the revocation list",
                 not set(_serials(ctx.revoked[device])) <= listed)) if there]
            if left:
                raise ProvisionError(f"revoked device {device!r} would still have "
                                     f"{' and '.join(left)}; nothing was written")


class Planner(Builder):
    """The federation from its file: roles, the dataset split, students, the settings the
    server publishes, each agent-only device's model source, and every party's kit."""

    def initialize(self, ctx: ProvisionContext) -> None:
        spec, revoked = ctx.spec, ctx.revoked
        active = [d for d in spec.devices if d.id not in revoked]
        _check_orphan_kits(ctx)
        roles = _roles(spec, active)

        dataset_path = _dataset_file(spec)
        trainers = [d for d in active if roles[d.id] == CLIENT_ROLE]
        shard_devices = [d.id for d in trainers if d.data is None]
        split = _split(spec, dataset_path, max(1, len(shard_devices)))
        measured = _measured_zoo(ctx, split)
        batch_size = spec.settings.get("batch_size", DEFAULT_BATCH_SIZE)
        students = {d.id: _student(spec, d, split, batch_size) for d in trainers}
        config = _config(spec, split, students)
        _homogeneous(spec, config, students)
        sources = {d.id: _model_from(spec, d, students, split, revoked)
                   for d in active if roles[d.id] == AGENT_ROLE}

        ref = DatasetRef(DATASET_FILE if dataset_path else spec.dataset.source,
                         spec.dataset.partition, float(spec.dataset.alpha), spec.dataset.seed,
                         max(1, len(shard_devices)), split.proxy_sha256)
        settings = {k: v for k, v in config.to_dict().items() if k != "run_id"}

        def party_kit(party: str, **fields) -> Kit:
            access = BrokerAccess(spec.broker.host, spec.broker.tls_port, party)
            return Kit(ctx.root / party, spec.name, party, access, ref, settings, **fields,
                       zoo=ZOO_FILE if spec.zoo else None, zoo_students=measured)
        kits = [party_kit(SERVER_ID, devices=tuple(students), agents=sources)]
        kits += [party_kit(d.id, profile=d.profile,
                           **_device_fields(d, config.seed, students, sources, shard_devices))
                 for d in active]
        devices = [PartyPlan(kit.device, kit.profile, kit.student,
                             "kept" if kit.file.exists() else "new", kit.role, kit.model_from,
                             _beyond_budgets(kit, split)) for kit in kits[1:]]
        ctx.plan = FederationPlan(config, dataset_path, kits, list(sources), devices)


class Certificates(Builder):
    """The federation CA (kept, or created on the first run) and every certificate: one per
    MQTT user (the broker takes its CN as the user name), the server's code-signing one, the
    broker's TLS one, and the kit-signing one that stays in ca/ with the CA."""

    def initialize(self, ctx: ProvisionContext) -> None:
        ctx.ca = _existing_ca(ctx)

    def build(self, ctx: ProvisionContext) -> None:
        ca_dir = private_dir(ctx.root / CA_DIR)
        if ctx.ca is None:
            ctx.ca = pki.create_ca(ctx.spec.name)
            ctx.ca.save(ca_dir / CA_FILE, ca_dir / CA_KEY)
        ctx.signer = _identity(ca_dir, SIGNER_CERT, SIGNER_KEY, ctx.ca,
                               f"fededge {ctx.spec.name} kit signing", usage=pki.KIT_SIGNING)
        for kit in ctx.plan.kits:
            directory = private_dir(kit.directory)
            if kit.is_server or kit.trains:
                _identity(directory, CERT_FILE, KEY_FILE, ctx.ca, kit.device)
            else:  # an agent-only device logs in only as its agent
                for name in (CERT_FILE, KEY_FILE):
                    (directory / name).unlink(missing_ok=True)
            for role in party_roles(kit.device):
                _identity(directory, *login_files(role), ctx.ca, role_user(kit.device, role))
            if kit.is_server:  # signs `fededge deploy` bundles, so the CA key can stay offline
                _identity(directory, DEPLOY_CERT_FILE, DEPLOY_KEY_FILE, ctx.ca,
                          role_user(SERVER_ID, DEPLOY_ROLE), usage=CODE_SIGNING)
            write_file(directory / CA_FILE, ctx.ca.cert_pem)
        broker = private_dir(ctx.root / BROKER_DIR)
        hosts = [ctx.spec.broker.host, *ctx.spec.broker.alt_names, *LOOPBACK_NAMES]
        _identity(broker, mq.CERT_NAME, mq.KEY_NAME, ctx.ca, ctx.spec.broker.host, hosts)
        write_file(broker / mq.CA_NAME, ctx.ca.cert_pem)

    def finalize(self, ctx: ProvisionContext) -> None:
        """The CA key and the kit-signing key are in ca/ and nowhere else."""
        keys = [(ctx.root / CA_DIR / name).read_bytes() for name in (CA_KEY, SIGNER_KEY)]
        for path in sorted(ctx.root.rglob("*")):
            if (path.is_file() and path.relative_to(ctx.root).parts[0] != CA_DIR
                    and path.stat().st_size in {len(k) for k in keys}
                    and path.read_bytes() in keys):
                raise ProvisionError(f"{ctx.shown(path)} would hold a key of {ctx.out / CA_DIR}"
                                     ", which never leaves it; nothing was written")


class PartyKits(Builder):
    """The server's and each device's kit: password, dataset, kit file, start script, unit."""

    def build(self, ctx: ProvisionContext) -> None:
        for kit in ctx.plan.kits:
            ctx.passwords[kit.device] = _write_party_kit(kit, ctx.spec, ctx.plan.dataset_path)

    def finalize(self, ctx: ProvisionContext) -> None:
        """Every kit written reads back as a kit (what `fededge server`/`client` load)."""
        for kit in ctx.plan.kits:
            load_kit(kit.directory)


class BrokerKit(Builder):
    """The broker's kit: Mosquitto's password file, ACL, revocation list and configuration,
    start script, unit."""

    def build(self, ctx: ProvisionContext) -> None:
        directory = ctx.root / BROKER_DIR
        _write_broker_kit(directory, ctx.spec, ctx.passwords, ctx.plan.config, ctx.plan.agents)
        _write_crl(directory / mq.CRL_NAME, ctx.ca,
                   [serial for entry in ctx.revoked.values() for serial in _serials(entry)])


class Manifests(Builder):
    """The SHA-256 of every file: one manifest per kit, one over all of them, each signed by
    the kit-signing certificate. Builds last."""

    def build(self, ctx: ProvisionContext) -> None:
        name, signer = ctx.spec.name, ctx.signer
        for kit in ctx.plan.kits:
            write_manifest(kit.directory, f"fededge kit of {kit.device!r}, federation {name!r}",
                           signer)
        write_manifest(ctx.root / BROKER_DIR, f"fededge broker kit, federation {name!r}",
                       signer)
        write_manifest(ctx.root, f"fededge kits of federation {name!r}", signer)

    def finalize(self, ctx: ProvisionContext) -> None:
        """Every kit verifies as `fededge verify-kit` will check it."""
        for directory in [*(kit.directory for kit in ctx.plan.kits), ctx.root / BROKER_DIR,
                          ctx.root]:
            problems = verify_manifest(directory).problems
            if problems:
                raise ProvisionError(f"{ctx.shown(directory)}: {problems[0]}; nothing was "
                                     "written")


def builders() -> list[Builder]:
    """Provisioning's builders, in order (finalize runs in reverse)."""
    return [Revocations(), Planner(), Certificates(), PartyKits(), BrokerKit(), Manifests()]


def provision(federation_file: str | Path, out: str | Path,
              revoke: list[str] | None = None,
              measure_zoo: ZooMeasurer | None = None) -> ProvisionResult:
    """Write or update the kits of ``federation_file`` below ``out``: all of them, or, on any
    error, none (``out`` is left as it was). ``measure_zoo`` is needed when the file names a
    zoo (``ZooMeasurer``)."""
    spec = load_federation_file(federation_file)
    revoke = list(revoke or [])
    ctx = ProvisionContext(out=Path(out), spec=spec, revoke=revoke, measure_zoo=measure_zoo)
    Provisioner(builders()).provision(ctx)
    return ProvisionResult(ctx.out, ctx.plan.config, ctx.plan.devices, sorted(set(revoke)),
                           [d.id for d in spec.devices if d.id in ctx.revoked
                            and d.id not in revoke], pki.fingerprint(ctx.ca.cert))


# ----------------------------------------------------------------------------- checks

def _revocations(ctx: ProvisionContext) -> dict[str, dict]:
    """Earlier revocations (``ca/revoked.json``) plus this run's, with certificate serials."""
    spec, root = ctx.spec, ctx.root
    path = root / CA_DIR / REVOKED_FILE
    revoked = json.loads(path.read_text()) if path.is_file() else {}
    listed = {d.id for d in spec.devices}
    for device in ctx.revoke:
        kit = root / device
        if device not in listed | set(revoked) and not (kit / CLIENT_FILE).is_file():
            raise ProvisionError(f"--revoke {device}: no such device in {spec.path} or {ctx.out}")
        if device in revoked:
            continue
        certs = [kit / login_files(role)[0] for role in (None, *party_roles(device))]
        revoked[device] = {"serials": [format(pki.load_certificate(c).serial_number, "x")
                                       for c in certs if c.is_file()]}
    return revoked


def _serials(entry: dict) -> list[int]:
    """The certificate serials of one ``revoked.json`` entry (``serial``: before each MQTT user
    had its own certificate)."""
    listed = entry.get("serials") or ([entry["serial"]] if entry.get("serial") else [])
    return [int(serial, 16) for serial in listed]


def _check_orphan_kits(ctx: ProvisionContext) -> None:
    """A kit whose device left the file: silently dropping its access would be a revocation
    nobody asked for, and keeping it would leave credentials nobody tracks."""
    spec = ctx.spec
    listed = {d.id for d in spec.devices}
    for kit in sorted(ctx.root.iterdir()):
        if (kit / CLIENT_FILE).is_file() and kit.name not in listed | set(ctx.revoked):
            raise ProvisionError(
                f"{ctx.shown(kit)}: device {kit.name!r} has a kit but is no longer in "
                f"{spec.path}; add it back, or revoke it with --revoke {kit.name}")


def _roles(spec: FederationSpec, active: list[DeviceSpec]) -> dict[str, str]:
    """Each active device's role: its ``role``, else by its profile's ``can_train``; and the
    keys that only one role may use. At least one device must train."""
    if not active:
        raise ProvisionError(f"{spec.path}: every device is revoked; add a device with a new id")
    roles = {}
    for device in active:
        can_train = _profile(spec, device).can_train
        role = roles[device.id] = device.role or (CLIENT_ROLE if can_train else AGENT_ROLE)
        wrong = _role_conflict(device, role, can_train)
        if wrong is not None:
            key, why = wrong
            raise spec.error("devices", key, f"device {device.id!r}: {why}", device.index)
    if CLIENT_ROLE not in roles.values():
        raise ProvisionError(f"{spec.path}: no device trains (all are agent-only); add a "
                             "[[devices]] table whose profile can train")
    return roles


def _role_conflict(device: DeviceSpec, role: str, can_train: bool) -> tuple[str, str] | None:
    """The key that contradicts the device's role, and why; None if all agree."""
    if role == CLIENT_ROLE and not can_train:
        return "role", (f"profile {device.profile!r} cannot train (can_train = false); drop "
                        'role = "client" to make it an agent-only device that receives models')
    if role == CLIENT_ROLE and device.model_from is not None:
        return "model_from", ('model_from is for agent-only devices; add role = "agent" or '
                              "drop model_from")
    if role == AGENT_ROLE and device.student is not None:
        return "student", ("an agent-only device runs the student of its model_from device; "
                           "drop student (or set model_from)")
    if role == AGENT_ROLE and device.data is not None:
        return "data", "an agent-only device trains nothing; drop data"
    return None


def _profile(spec: FederationSpec, device: DeviceSpec) -> DeviceProfile:
    try:
        return get_profile(device.profile)
    except ProfileError as exc:
        raise spec.error("devices", "profile", f"device {device.id!r}: {exc}",
                         device.index) from None


def _model_from(spec: FederationSpec, device: DeviceSpec, students: dict[str, str],
                split: FederatedSplit, revoked: dict[str, dict]) -> str:
    """The training device whose model an agent-only device runs: its ``model_from``, else
    the one with the largest student (first in the file on a tie) whose inference fits the
    device's budgets."""
    source = device.model_from
    if source is not None:
        if source not in students:
            why = "revoked" if source in revoked else "agent-only too"
            raise spec.error("devices", "model_from", f"device {device.id!r}: model_from "
                             f"{source!r} is {why}; name a device that trains "
                             f"({', '.join(students)})", device.index)
        return source
    profile = _profile(spec, device)
    zoo = zoo_for(split.input_shape)
    fitting = [d for d, student in students.items() if not inference_exceeds(
        profile, student, split.input_shape, split.num_classes)]
    if not fitting:
        smallest = min(students.values(), key=zoo.index)
        raise spec.error("devices", "profile", f"device {device.id!r}: no trained student fits "
                         f"the budgets of profile {profile.name!r} (the smallest, {smallest}, "
                         "exceeds them); set model_from = \"<device>\" to run one anyway, or "
                         "give a training device a smaller student", device.index)
    return max(fitting, key=lambda d: zoo.index(students[d]))


def _beyond_budgets(kit: Kit, split: FederatedSplit) -> str | None:
    """A note when an agent-only device was given (``model_from``) a model its profile's
    budgets would not pick: the operator's call, but worth saying."""
    if kit.trains:
        return None
    exceeded = inference_exceeds(get_profile(kit.profile), kit.student, split.input_shape,
                                 split.num_classes)
    if not exceeded:
        return None
    details = "; ".join(f"{budget} {detail}" for budget, detail in exceeded.items())
    return (f"{kit.device} runs {kit.model_from}'s {kit.student}, beyond the budgets of profile "
            f"{kit.profile!r} ({details})")


def _dataset_file(spec: FederationSpec) -> Path | None:
    """The .npz to ship in every kit, or None for a built-in dataset."""
    source = spec.dataset.source
    if not source.endswith(".npz"):
        return None
    path = Path(source)
    return path if path.is_absolute() else spec.path.parent / path


def _split(spec: FederationSpec, dataset_path: Path | None, shards: int) -> FederatedSplit:
    try:
        dataset = load_dataset(dataset_path or spec.dataset.source)
        return split_federated(dataset, shards, partition=spec.dataset.partition,
                               alpha=spec.dataset.alpha, seed=spec.dataset.seed)
    except DataError as exc:
        raise spec.error("dataset", "source", str(exc)) from None


def _measured_zoo(ctx: ProvisionContext, split: FederatedSplit) -> dict[str, MeasuredStudent]:
    """The federation's own students, measured (and registered for picking) by
    ``ctx.measure_zoo``, as every kit records them; none without a zoo file."""
    spec = ctx.spec
    if spec.zoo is None:
        return {}
    if ctx.measure_zoo is None:
        raise spec.error("federation", "zoo", "zoo: measuring the zoo file's students needs "
                         "torch, which this install lacks; provision on a machine with "
                         "`pip install 'fededge[train]'`, or drop zoo")
    figures = ctx.measure_zoo(spec.zoo, tuple(split.input_shape), split.num_classes)
    return {name: MeasuredStudent(m.params, m.flops, m.activation_floats)
            for name, m in figures.items()}


def _student(spec: FederationSpec, device: DeviceSpec, split: FederatedSplit,
             batch_size: int) -> str:
    """The device's student: its override, else the largest that fits its profile when it
    trains with batches of the federation's ``batch_size``."""
    try:
        if device.student is None:
            profile = get_profile(device.profile)
            return pick_student(profile, split.input_shape, split.num_classes,
                                batch_size).student
    except ProfileError as exc:
        raise spec.error("devices", "profile", f"device {device.id!r}: {exc}",
                         device.index) from None
    zoo = zoo_for(split.input_shape)
    if device.student not in zoo:
        raise spec.error("devices", "student", f"device {device.id!r}: unknown student "
                         f"{device.student!r} for this dataset; choose one of {', '.join(zoo)}",
                         device.index)
    return device.student


def _homogeneous(spec: FederationSpec, config: FederationConfig,
                 students: dict[str, str]) -> None:
    """Strategies that average weights train ``config.student`` on every device."""
    if not strategy_pair(config.strategy)[0].homogeneous:
        return
    for device in spec.devices:
        if device.student is not None and device.id in students:
            raise spec.error("devices", "student", f"device {device.id!r}: strategy "
                             f"{config.strategy!r} trains one architecture on every device; set "
                             "[training] student instead", device.index)
    students.update(dict.fromkeys(students, config.student))


def _config(spec: FederationSpec, split: FederatedSplit,
            students: dict[str, str]) -> FederationConfig:
    """The federation's settings; a weight-averaging strategy without ``[training] student``
    gets the smallest of the devices' picks, as in ``simulate``."""
    settings = {"seed": spec.dataset.seed, **spec.settings}
    if settings.get("ldp_noise_multiplier", 0) > 0:
        settings.setdefault("share_class_counts", False)  # see FederationConfig's check
    try:
        if strategy_pair(settings.get("strategy", "fedmd"))[0].homogeneous:
            zoo = zoo_for(split.input_shape)
            settings.setdefault("student", min(students.values(), key=zoo.index))
        config = FederationConfig(
            federation=spec.name, num_classes=split.num_classes,
            input_shape=tuple(split.input_shape), proxy_sha256=split.proxy_sha256,
            proxy_size=len(split.public_X), **settings)
        # validates strategy and aggregator, and that the devices can run the strategy
        strategy_pair(config.strategy)[0](config).check_devices(students)
    except (ConfigError, UnknownStrategyError, UnknownAggregatorError) as exc:
        named = re.search(r"'(\w+)'", str(exc))
        key = named.group(1) if named else None
        short = {v: k for k, v in PRIVACY_KEYS.items()}
        table = "privacy" if key in short else "training"
        if isinstance(exc, UnknownStrategyError):
            key = "strategy"
        elif isinstance(exc, UnknownAggregatorError):
            key = "aggregator"
        raise spec.error(table, short.get(key, key), str(exc)) from None
    return config


def _device_fields(device: DeviceSpec, seed: int, students: dict[str, str],
                   sources: dict[str, str], shards: list[str]) -> dict:
    """What a device's kit says by role: an agent-only device's model source (and its
    student), a training device's student, initialisation seed and data or demo shard."""
    if device.id in sources:
        source = sources[device.id]
        return {"role": AGENT_ROLE, "model_from": source, "student": students[source]}
    return {"student": students[device.id], "seed": seed + device.index, "data": device.data,
            "shard": shards.index(device.id) if device.data is None else None}


# ----------------------------------------------------------------------------- writing

def _existing_ca(ctx: ProvisionContext) -> pki.Identity | None:
    """The federation CA of an earlier run (None on the first): it is kept, never replaced."""
    directory = ctx.root / CA_DIR
    cert, key = directory / CA_FILE, directory / CA_KEY
    if cert.exists() and key.exists():
        return pki.Identity.load(cert, key)
    if cert.exists() or key.exists():
        raise ProvisionError(f"{ctx.shown(directory)}: holds only one of {CA_FILE} and {CA_KEY}; "
                             "restore the other (re-creating the CA would invalidate every kit)")
    return None


def _identity(directory: Path, cert_name: str, key_name: str, ca: pki.Identity,
              common_name: str, hosts: list[str] | None = None,
              usage: x509.ObjectIdentifier | None = None) -> pki.Identity:
    """Keep a certificate that still chains to the CA and names the same party (and covers
    the same hosts, for the same purpose); issue a new one otherwise."""
    cert_path, key_path = directory / cert_name, directory / key_name
    usage = usage or (SERVER_AUTH if hosts else CLIENT_AUTH)
    if cert_path.exists() and key_path.exists():
        kept = pki.Identity.load(cert_path, key_path)
        cert = kept.cert
        if (pki.issued_by(cert, ca.cert) and pki.common_name(cert) == common_name
                and set(hosts or []) <= set(pki.server_hosts(cert))
                and pki.usages(cert) == {usage}):
            return kept
    fresh = pki.issue(ca, common_name, hosts=hosts, usage=usage)
    fresh.save(cert_path, key_path)
    return fresh


def _write_crl(path: Path, ca: pki.Identity, serials: list[int]) -> None:
    """The revocation list of ``serials``; an existing one of the same CA and serials is kept
    (a re-run changes no file it need not)."""
    if path.is_file():
        try:
            if pki.crl_lists(path.read_bytes(), ca.cert, serials):
                return
        except pki.PkiError:
            pass  # unreadable or another CA's: replaced
    write_file(path, pki.revocation_list(ca, serials))


def _password(directory: Path) -> str:
    path = directory / PASSWORD_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    write_secret(path, password + "\n")
    return password


def _write_party_kit(kit: Kit, spec: FederationSpec, dataset_path: Path | None) -> str:
    """Write one server or device kit (its certificates aside); returns its broker password."""
    directory = private_dir(kit.directory)
    password = _password(directory)
    if dataset_path is not None and (kit.is_server or kit.trains):
        write_file(directory / DATASET_FILE, dataset_path.read_bytes())
    else:  # a built-in dataset, or an agent-only device (it may have trained before)
        (directory / DATASET_FILE).unlink(missing_ok=True)
    if spec.zoo is not None:  # covered by the kit's manifest like every other file
        write_file(directory / ZOO_FILE, spec.zoo.read_bytes())
    else:
        (directory / ZOO_FILE).unlink(missing_ok=True)
    role = "server" if kit.is_server else kit.role  # also the `fededge` command it runs
    what = _describe(kit)
    write_file(kit.file, kit.to_toml(
        f"fededge kit of {what}, federation {spec.name!r}, written by `fededge provision`.\n"
        "Start it with ./start.sh (or the systemd unit beside it). Re-provision rather than\n"
        "edit: the [config] table is what the server publishes, the rest says how to reach\n"
        "the broker and how to re-derive the federation's proxy set (checked by proxy_sha256)."))
    write_file(directory / "start.sh", _start_script(role, what, spec.name), executable=True)
    threads = get_profile(kit.profile).threads if not kit.is_server else None
    for other in set(ROLES) - {role}:  # a device whose role changed: its old unit goes
        (directory / f"fededge-{other}.service").unlink(missing_ok=True)
    write_file(directory / f"fededge-{role}.service", _unit(role, what, spec.name, threads))
    return password


def _describe(kit: Kit) -> str:
    """Who a kit belongs to, for its file headers."""
    if kit.is_server:
        return "the federation server"
    if kit.trains:
        return f"device {kit.device!r} (profile {kit.profile})"
    return (f"agent-only device {kit.device!r} (profile {kit.profile}, model of "
            f"{kit.model_from!r})")


def _write_broker_kit(directory: Path, spec: FederationSpec, passwords: dict[str, str],
                      config: FederationConfig, agents: list[str]) -> None:
    """The broker kit, its TLS certificate aside; ``agents``: the agent-only devices among
    ``passwords``' parties."""
    directory = private_dir(directory)
    passwd = directory / mq.PASSWD_NAME
    previous = mq.parse_passwd(passwd.read_text()) if passwd.is_file() else {}
    write_secret(passwd, mq.render_passwd(mq.broker_users(passwords, agents), previous))
    devices = [p for p in passwords if p != SERVER_ID and p not in agents]
    write_file(directory / mq.ACL_NAME, mq.render_acl(spec.name, devices, agents))
    write_file(directory / mq.CONF_NAME, mq.render_conf(mq.ConfSettings(
        config, spec.broker.bind, spec.broker.tls_port, spec.broker.plain_port, len(devices),
        len(agents), spec.broker.user)))
    what = "the MQTT broker (Mosquitto)"
    write_file(directory / "start.sh", _start_script("broker", what, spec.name), executable=True)
    write_file(directory / "fededge-broker.service", _unit("broker", what, spec.name, None))


def _start_script(role: str, what: str, federation: str) -> str:
    trains = role in ("server", CLIENT_ROLE)
    return render("start.sh.in", role=role, what=what, federation=federation, wheel=WHEEL,
                  if_trains=when(trains), if_not_trains=when(not trains),
                  if_device=when(role in ROLES))


def _unit(role: str, what: str, federation: str, threads: int | None) -> str:
    """A systemd unit for a Pi, a Jetson or any Linux host (paths in the install notes)."""
    broker, agent = role == "broker", role == AGENT_ROLE
    return render("fededge.service.in", role=role, what=what, federation=federation,
                  user="mosquitto" if broker else "fededge", kit=f"/etc/fededge/{role}",
                  state_dir=STATE_DIR, threads=threads or None,
                  if_broker=when(broker), if_not_broker=when(not broker),
                  if_agent=when(agent), if_not_agent=when(not agent),
                  if_state=when(role in ("server", CLIENT_ROLE)),
                  if_not_state=when(role not in ("server", CLIENT_ROLE)), wheel=WHEEL,
                  if_train=when(role in ("server", CLIENT_ROLE)),
                  if_not_train=when(role not in ("server", CLIENT_ROLE)))
