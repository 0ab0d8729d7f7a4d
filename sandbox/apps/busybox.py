"""helm test pods that run busybox `wget`: the pod is the request it makes, through the Service resolution pod
processes use (sandbox/kube/services.py).

Source: upstream busybox (git.busybox.net, mirror read at 371fe9f, tag 1_36_1), networking/wget.c and
libbb/xconnect.c. Texts and exit codes: every error dies
through bb_error_msg_and_die (exit 1, `wget: ` prefix on stderr): `bad address '<host:port>'` when the name does not
resolve, `can't connect to remote host (<ip>): Connection refused`, `server returned error: <status line>` for a
status other than 2xx/3xx, `download timed out` after -T; without -q it prints `Connecting to <host:port>
(<ip>:<port>)`, `remote file exists` with --spider, `written to stdout` with -O-, else `saving to '<file>'` and
`'<file>' saved`. Only a pinned busybox tag is pulled (no `latest`). Known gap, looser than busybox: an option
other than -q, -O, -T, -s/--spider and --timeout is skipped rather than refused (busybox's getopt32 fails on one it
does not know); the example charts use only these.
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


def parse(argv: list[str]) -> tuple[dict, list[str]] | None:
    """wget's options and URLs; None when argv is not a wget call."""
    if not argv or posixpath.basename(argv[0]) != "wget":
        return None
    options = {"quiet": False, "output": None, "spider": False, "timeout": 900.0}
    urls, words = [], iter(argv[1:])
    for word in words:
        if word in ("--spider", "-s"):
            options["spider"] = True
        elif word.startswith("--timeout"):
            options["timeout"] = float(word.partition("=")[2] or next(words))
        elif word.startswith("-") and not word.startswith("--") and len(word) > 1:
            letters = word[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter == "q":
                    options["quiet"] = True
                elif letter in ("O", "T"):
                    value = letters or next(words)
                    letters = ""
                    if letter == "O":
                        options["output"] = value
                    else:
                        options["timeout"] = float(value)
        elif not word.startswith("-"):
            urls.append(word)
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
        parsed = parse(command + args)
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
