"""``medseg demo`` and ``medseg web``: the two faces, opened from the shell once what they need is checked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import MedsegError


def cmd_demo(args) -> int:
    from ..models import read_meta, resolve_model_path

    # said before napari starts, with exit 2: the demo had shown a missing checkpoint as a notification
    # and exited 0, and a screenshot into a missing folder failed once the whole demo had run
    read_meta(resolve_model_path(args.model))
    if args.screenshot and not Path(args.screenshot).resolve().parent.is_dir():
        raise MedsegError(f"--screenshot {args.screenshot}: the folder {Path(args.screenshot).parent} does not exist.")
    _check_display()
    # The napari face is imported only here, so the rest of the CLI runs headless.
    from .._napari.demo import run_demo

    run_demo(model=args.model, show=not args.no_show, screenshot=args.screenshot)
    return 0


def _check_display() -> None:
    """napari draws with OpenGL in a window, even with --no-show: on Linux without a display Qt
    aborted the process (exit 134, no message). Said first, with the way round it."""
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    raise MedsegError("the demo opens napari, which needs a display, and none is set (DISPLAY / WAYLAND_DISPLAY). "
                      "On a machine without one run it in a virtual display: xvfb-run -a medseg demo --no-show "
                      "--screenshot demo.png")


def cmd_web(args) -> int:
    try:  # an optional extra: the rest of the CLI works without it
        from ..web.app import serve
    except ImportError as exc:
        raise MedsegError(f"the browser front needs Gradio ({exc.name} is missing): "
                          'pip install "napari-medseg[web]"') from exc
    if args.models and not Path(args.models).is_dir():
        raise MedsegError(f"--models: '{args.models}' is not a folder.")
    _check_can_listen(args.host, args.port)
    print(f"napari-medseg web: http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    serve(args.host, args.port, args.models, args.device, backend=args.backend)
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Refuses a host this machine cannot listen on, or a port in use, before Gradio starts: it
    had said 'Cannot find empty port ... launch()' for both, after the models had been set up."""
    import socket

    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as a browser writes it
    try:
        family, _, _, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise MedsegError(f"--host {host}: not an address or name this machine can resolve ({exc}); use 127.0.0.1 "
                          "(this machine only, the default), 0.0.0.0 (the network) or one of its addresses.") from exc
    _check_port_free(family, where, host)
    if where[0] != "127.0.0.1":  # Gradio checks the port there too, whatever the host
        _check_port_free(socket.AF_INET, ("127.0.0.1", port), "127.0.0.1")


def _check_port_free(family, where: tuple, host: str) -> None:
    """Binds a socket to ``where`` as the server will (then closes it); its failure in words."""
    import errno
    import socket

    port = where[1]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if os.name != "nt":  # as the server binds: a port left in TIME_WAIT by a stopped server is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MedsegError(f"port {port} on {host} is in use (another server, or an earlier medseg web "
                                  "still running); choose another with --port.") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise MedsegError(f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine "
                                  "only, the default), 0.0.0.0 (the network) or one of its addresses.") from exc
            if exc.errno == errno.EACCES:
                raise MedsegError(f"port {port} on {host}: not allowed ({exc.strerror}; ports under 1024 need "
                                  "administrator rights); choose another with --port.") from exc
            raise MedsegError(f"cannot listen on {host} port {port}: {exc.strerror or exc}.") from exc
