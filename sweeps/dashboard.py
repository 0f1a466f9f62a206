"""`prunevision sweep dashboard DIR`: optuna-dashboard on a sweep's study (``DIR/optuna.db``).

It serves optuna-dashboard's WSGI app the way the optuna-dashboard command does (wsgiref, one
thread a request), bound to 127.0.0.1 unless asked otherwise, and stops cleanly (exit 0) on Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sweeps.run import STUDY_FILE, load_state
from sweeps.spec import SweepError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection never holds up the exit,
    block_on_close = False  # nor server_close(), which would otherwise join every request thread


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # one line per request would drown the terminal


def study_storage(sweep_dir: str | Path) -> tuple[str, str]:
    """(storage URL, study name) of a sweep folder; one-line SweepError when it is not a sweep or
    has no study yet."""
    state = load_state(sweep_dir)
    db = Path(sweep_dir).resolve() / STUDY_FILE  # the folder given (it may have been moved or copied)
    if not db.is_file():
        raise SweepError(f"{sweep_dir} has no Optuna study yet ({STUDY_FILE} is written when the first trial "
                         "is suggested)")
    return f"sqlite:///{db}", state["name"]


def serve(sweep_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Serve the dashboard until Ctrl-C or SIGTERM; returns 0 then."""
    import optuna
    import optuna_dashboard

    url, name = study_storage(sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        study_path = f"/dashboard/studies/{storage.get_study_id_from_name(name)}"
    except KeyError:  # the study is named otherwise: the dashboard lists what the file holds
        study_path = "/dashboard"
    try:
        httpd = make_server(host, port, optuna_dashboard.wsgi(storage),
                            server_class=_Server6 if ":" in host else _Server, handler_class=_QuietHandler)
    except OSError as e:
        raise SweepError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port") from None
    bound = httpd.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"Optuna dashboard for sweep {name}: http://{shown}:{bound}{study_path}  (Ctrl-C to stop)", flush=True)
    if host not in LOOPBACK:
        print(f"prunevision: warning: the dashboard listens on {host} without any login; anyone who can reach "
              "this machine can read and change the study", file=sys.stderr, flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # signals reach the main thread only. SIGINT gets the handler too: a process started with SIGINT
    # ignored (a background job of a script, as CI runs it) would otherwise never stop on Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        httpd.server_close()
    print("dashboard stopped", flush=True)
    return 0
