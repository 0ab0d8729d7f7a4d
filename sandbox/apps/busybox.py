"""helm test pods that run busybox `wget`: the pod is the request it makes, through the Service resolution pod
processes use (sandbox/kube/services.py).

Source: upstream busybox (git.busybox.net, mirror read at 371fe9f, tag 1_36_1), networking/wget.c and
libbb/xconnect.c. Texts and exit codes: every error dies
through bb_error_msg_and_die (exit 1, `wget: ` prefix on stderr): `bad address '<host:port>'` when the name does not
resolve, `can't connect to remote host (<ip>): Connection refused`, `server returned error: <status line>` for a
status other than 2xx/3xx, `download timed out` after -T; without -q it prints `Connecting to <host:port>
(<ip>:<port>)`, `remote file exists` with --spider, `written to stdout` with -O-, else `saving to '<file>'` and
`'<file>' saved`. Only a pinned busybox tag is pulled (no `latest`).

Options are wget_main's own (networking/wget.c 1_36_1: the getopt32 string "cqSO:o:P:Y:U:T:+t:n::" and
`wget_longopts`, with the official image's defconfig: FEATURE_WGET_LONG_OPTIONS, FEATURE_WGET_TIMEOUT, DESKTOP):
glibc getopt_long parses them (permuting, `--` ends them, a long option may be any unique prefix). Anything else,
or no URL ("-1"), goes to bb_show_usage (libbb/getopt32.c `error:`, libbb/appletlib.c): getopt's own complaint,
the usage and exit 1. There is no `-s` (spider is `--spider` only).
"""

from __future__ import annotations

import http.client
import posixpath
import re

from sandbox.kube import KubeEmulator, PodHandle, services

IMAGE = re.compile(r"^(docker\.io/)?(library/)?busybox:(?!latest$)[\w.-]+(@sha256:[0-9a-f]{64})?$")


def is_busybox(image: str) -> bool:
    """A pinned busybox image (a tag other than latest)."""
    return bool(IMAGE.match(image))


SHORT_FLAGS, SHORT_WITH_VALUE = set("cqS"), set("OoPYUTt")
LONG_FLAGS = {"continue": "c", "quiet": "q", "server-response": "S", "spider": "spider",
              "no-check-certificate": "", "passive-ftp": "", "no-cache": "", "no-verbose": "", "no-clobber": "",
              "no-host-directories": "", "no-parent": ""}
LONG_WITH_VALUE = {"output-document": "O", "output-file": "o", "directory-prefix": "P", "proxy": "Y",
                   "user-agent": "U", "timeout": "T", "tries": "t", "header": "", "post-data": "", "post-file": ""}
USAGE = ("Usage: wget [-cqS] [--spider] [-O FILE] [-o LOGFILE] [--header STR]\n"
         "\t[--post-data STR | --post-file FILE] [-Y on/off]\n"
         "\t[--no-check-certificate] [-P DIR] [-U AGENT] [-T SEC] URL...")


class UsageError(ValueError):
    """What wget prints before its usage: glibc getopt's complaint (posix/getopt.c), or nothing."""


def _long_option(word: str, words) -> tuple[str, str | None]:
    name, has_value, value = word[2:].partition("=")
    known = {**LONG_FLAGS, **LONG_WITH_VALUE}
    matches = [n for n in known if n == name] or [n for n in known if n.startswith(name)]
    if not matches:
        raise UsageError(f"wget: unrecognized option '--{name}'")
    if len(matches) > 1:
        raise UsageError(f"wget: option '--{name}' is ambiguous; possibilities: "
                         + " ".join(f"'--{n}'" for n in matches))
    [full] = matches
    if full in LONG_FLAGS:
        if has_value:
            raise UsageError(f"wget: option '--{full}' doesn't allow an argument")
        return LONG_FLAGS[full], None
    if not has_value:
        value = next(words, None)
        if value is None:
            raise UsageError(f"wget: option '--{full}' requires an argument")
    return LONG_WITH_VALUE[full], value


def parse(argv: list[str]) -> tuple[dict, list[str]] | None:
    """wget's options and URLs; None when argv is not a wget call; UsageError where busybox shows its usage."""
    if not argv or posixpath.basename(argv[0]) != "wget":
        return None
    options = {"quiet": False, "output": None, "spider": False, "timeout": 900.0}
    urls, words = [], iter(argv[1:])
    for word in words:
        if word == "--":
            urls.extend(words)
            break
        if word.startswith("--"):
            letter, value = _long_option(word, words)
        elif word.startswith("-") and len(word) > 1:
            letters, value, letter = word[1:], None, ""
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter in SHORT_FLAGS:
                    options["quiet"] = options["quiet"] or letter == "q"
                    letter = ""
                elif letter in SHORT_WITH_VALUE:
                    value = letters or next(words, None)
                    if value is None:
                        raise UsageError(f"wget: option requires an argument -- '{letter}'")
                    break
                elif letter == "n":  # "n::": an optional value, attached only
                    letter = ""
                    break
                else:
                    raise UsageError(f"wget: invalid option -- '{letter}'")
        else:
            urls.append(word)
            continue
        if letter == "q":
            options["quiet"] = True
        elif letter == "spider":
            options["spider"] = True
        elif letter == "O":
            options["output"] = value
        elif letter == "T":
            try:  # "T:+": xatou_sfx of the value (libbb/getopt32.c `+`)
                options["timeout"] = float(int(value))
            except ValueError:
                raise UsageError(f"wget: invalid number '{value}'") from None
    if not urls:
        raise UsageError("")
    return options, urls


class BusyboxWget:
    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator

    def recognises(self, pod: dict) -> bool:
        containers = (pod.get("spec") or {}).get("containers") or []
        return len(containers) == 1 and is_busybox(containers[0].get("image", ""))

    def install(self) -> None:
        self.emulator.on_pod(self.recognises, self.run)

    def run(self, handle: PodHandle) -> None:
        container = handle.pod["spec"]["containers"][0]
        command, args, _ = handle.process(container)
        handle.running()
        try:
            parsed = parse(command + args)
        except UsageError as usage:
            for line in [str(usage), *USAGE.splitlines()] if str(usage) else USAGE.splitlines():
                handle.log(line)
            handle.terminate(1)
            return
        if parsed is None:
            name = (command + args or ["sh"])[0]
            handle.log(f"the sandbox runs busybox as wget only, not {name!r}")
            handle.terminate(127)
            return
        options, urls = parsed
        code = 0
        for url in urls:
            code = self._get(handle, url, options)
            if code:
                break
        handle.terminate(code)

    def _get(self, handle: PodHandle, url: str, options: dict) -> int:
        target = url.removeprefix("http://")
        hostport, _, path = target.partition("/")
        host, _, port_text = hostport.partition(":")
        port = int(port_text) if port_text.isdigit() else 80
        service = services.resolve_host(self.emulator, handle.namespace, host)
        if service is None:
            handle.log(f"wget: bad address '{hostport}'")
            return 1
        cluster_ip = (service.get("spec") or {}).get("clusterIP") or "10.96.0.1"
        if not options["quiet"]:
            handle.log(f"Connecting to {hostport} ({cluster_ip}:{port})")
        endpoint = services.service_endpoint(self.emulator, service, port)
        if endpoint is None:
            handle.log("wget: download timed out")
            return 1
        if endpoint == "" or endpoint.host_port is None:
            handle.log(f"wget: can't connect to remote host ({cluster_ip}): Connection refused")
            return 1
        connection = http.client.HTTPConnection("127.0.0.1", endpoint.host_port, timeout=options["timeout"])
        try:
            connection.request("HEAD" if options["spider"] else "GET", "/" + path,
                               headers={"Host": hostport, "User-Agent": "Wget"})
            response = connection.getresponse()
            body = response.read()
        except ConnectionRefusedError:
            handle.log(f"wget: can't connect to remote host ({cluster_ip}): Connection refused")
            return 1
        except TimeoutError:
            handle.log("wget: download timed out")
            return 1
        finally:
            connection.close()
        if not 200 <= response.status < 400:
            handle.log(f"wget: server returned error: HTTP/1.1 {response.status} {response.reason}")
            return 1
        if options["spider"]:
            if not options["quiet"]:
                handle.log("remote file exists")
            return 0
        if options["output"] == "-":
            handle.log(body.decode(errors="replace").rstrip("\n"))
            if not options["quiet"]:
                handle.log("written to stdout")
        elif not options["quiet"]:
            name = options["output"] or posixpath.basename(path) or "index.html"
            handle.log(f"saving to '{name}'")
            handle.log(f"'{name}' saved")
        return 0
