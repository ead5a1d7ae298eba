"""The web process: the run store, the event collector (worker events → store), the queue reconciler and the Gradio
app, together."""
from __future__ import annotations

import logging

from app import settings

log = logging.getLogger(__name__)


def serve(prevent_thread_lock: bool = False):
    """Start the collector and the web app on MORA_HOST:MORA_PORT; returns the app when not blocking (tests)."""
    settings.check_web()
    from starlette.middleware import Middleware

    from app.openai_api import OpenAIAPI
    from app.security import AllowedHosts, HostGuard, LoginThrottle, create_private_folder
    from app.service import StudioService
    from app.ui import CSS, build_app
    from storage.repo import Store
    from workers.collector import Collector
    from workers.reconciler import Reconciler
    from workers.settings import configured_redis_url

    create_private_folder(settings.data_dir())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = Store()
    redis_url = configured_redis_url()
    collector = Collector(store, redis_url).start() if redis_url else None
    if redis_url:
        Reconciler(store, redis_url).start()  # queued runs whose task a Redis restart erased are sent again
    if collector is None:
        log.warning("REDIS_URL is not set: no worker events will be collected")
    service = StudioService(store)
    app = build_app(service)
    app.queue(default_concurrency_limit=8)
    app.delete_cache = (settings.upload_cache_s(), settings.upload_cache_s())  # what Blocks(delete_cache=) sets
    auth = settings.auth()
    api_routes = OpenAIAPI(service, login=auth is not None).routes()  # /v1/...: the same app, port and Host guard
    guard = Middleware(HostGuard, hosts=AllowedHosts.build(settings.port(), settings.host(), settings.allowed_hosts()),
                       throttle=LoginThrottle() if auth else None)
    app.launch(server_name=settings.host(), server_port=settings.port(), auth=auth,
               app_kwargs={"middleware": [guard], "routes": api_routes}, max_file_size=f"{settings.max_upload_mb()}mb",
               prevent_thread_lock=prevent_thread_lock, show_error=False, allowed_paths=[str(settings.exports_dir())],
               footer_links=[], css=CSS)
    return app
