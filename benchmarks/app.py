"""Seconds from an uploaded file to boxes, and to boxes + Grad-CAMs of 5 detections, in the app.

Full-size model (width 1.0, random init: the timing does not depend on the weights) at 416, on
this machine's CPU, next to one forward pass of the same model. "Upload to boxes" is what the
server does with the uploaded file: decode, EXIF, letterbox, forward, decode + NMS, draw, table.
The goal: boxes <= 1.2x one forward pass; boxes + 5 CAMs <= 3x one forward pass.

    python -m benchmarks.app [--repeats 5] [--served] [--memory [--tree DIR]]
    python -m benchmarks.app --load 60 [--bundle app/bundle] [--sample shapes_000269.jpg]

--served also times the whole round trip through a local Gradio server with gradio_client
(upload over HTTP, queue, JPEG encoding of the outputs, download).
--memory: peak memory (ru_maxrss, in a fresh process that has imported the app) of reading one
10,000 x 10,000 16-bit grayscale PNG upload (~220 KB on disk, 200 MB decoded); `--tree DIR` runs
it against another checkout of the project (e.g. `git archive OLD app helpers | tar -x -C DIR`).
--load N: N users at once against the app served by a fresh server process (`python -m app.app`, its
default queue), each with its own gradio_client, all asking for the same sample with the page's
default settings (the case of a Space whose visitors click the same sample) and downloading the
outputs: prints the failed requests, the latency percentiles, the server's peak memory (VmHWM) and
the tracebacks in its log. Only the load test runs with --load.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from app import app as webapp
from benchmarks.timing import timed as timed_ms
from helpers.config import Config
from helpers.export import write_bundle
from helpers.model import YOLOv3
from helpers.postprocess import detect

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up run (first-call allocations, lazy imports)."""
    return timed_ms(fn, repeats, warmup=1) / 1000


def upload_memory(tree: Path) -> str:
    """One line: the peak memory of `read_upload` on a 10,000^2 16-bit PNG, in a fresh process."""
    import subprocess

    import numpy as np

    row = (np.arange(10_000, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    a = np.broadcast_to(row, (10_000, 10_000)).copy()
    a[4000:6000, 3000:7000] = 60000
    path = Path(tempfile.mkdtemp()) / "scan16.png"
    Image.fromarray(a).save(path, compress_level=9)
    del a
    # The peak (ru_maxrss) is a high-water mark that importing may already have set: the growth is
    # measured from the resident size just before the read.
    code = ("import resource, sys, time\nfrom app import app\n"
            "rss = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() // 1024\n"
            "t = time.perf_counter()\n"
            f"u = app.read_upload({str(path)!r})\nt = time.perf_counter() - t\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(f'resident {rss / 1024:.0f} MB after importing the app, peak {after / 1024:.0f} MB while reading '"
            "     f'(+{(after - rss) / 1024:.0f} MB) in {t:.2f} s; shown at {u.image.shape[1]}x{u.image.shape[0]}')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    return f"{path.stat().st_size / 1e3:.0f} KB 10000x10000 16-bit PNG: " + done.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load_test(users: int, bundle: Path, sample: Path, timeout: float = 900.0) -> None:
    """`users` requests at once against a served app, each from its own client; prints the figures."""
    from gradio_client import Client, handle_file

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app.app", "--bundle", str(bundle), "--port", str(port)],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the app did not start; its log:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        loaded, _ = webapp.load_source(bundle)
        size, top_k = loaded.info["image_size"], webapp.DEFAULT_TOP_K  # the page's defaults for this bundle
        conf = loaded.display_conf[0]
        start = threading.Barrier(users, timeout=timeout)

        def user(_: int) -> tuple[float, str | None]:
            try:
                client = Client(url, verbose=False)
            except Exception as e:  # noqa: BLE001 - a failure to count, not to stop on
                start.abort()
                return float("nan"), f"connect: {type(e).__name__}: {e}"
            start.wait()
            t = time.perf_counter()
            try:
                annotated, table, gallery, message = client.predict(
                    handle_file(str(sample)), conf, webapp.DEFAULT_IOU, size, "Grad-CAM", top_k, api_name="/predict")
                seconds = time.perf_counter() - t
                if annotated is None or not Path(annotated).is_file() or "detection" not in message:
                    return seconds, f"no result: {message!r}"
                if len(gallery) != min(top_k, len(table["data"])):
                    return seconds, f"{len(gallery)} CAMs for {len(table['data'])} detections"
                return seconds, None
            except Exception as e:  # noqa: BLE001
                return time.perf_counter() - t, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        t0 = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            results = list(pool.map(user, range(users)))
        wall = time.perf_counter() - t0
        peak = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    failures = [err for _, err in results if err]
    seconds = sorted(s for s, err in results if not err)
    server_log = log_path.read_text(errors="replace")
    print(f"{users} concurrent requests, {sample.name} at {size} px, conf {conf:g}, top {top_k} Grad-CAMs, "
          f"bundle {bundle}; {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"  failed: {len(failures)} of {users}")
    for err in sorted(set(failures)):
        print(f"    {failures.count(err)} x {err}")
    if seconds:
        print(f"  latency of the answered (submit -> outputs downloaded): p50 {_percentile(seconds, 50):.1f} s, "
              f"p95 {_percentile(seconds, 95):.1f} s, max {seconds[-1]:.1f} s; all answered in {wall:.1f} s")
    print(f"  server peak memory (VmHWM): {peak / 1024:.2f} GB")
    print(f"  server log: {server_log.count('Traceback')} tracebacks "
          f"({server_log.count('LocalProtocolError')} h11 LocalProtocolError); {log_path}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--served", action="store_true")
    p.add_argument("--memory", action="store_true", help="also the peak memory of a huge 16-bit PNG upload")
    p.add_argument("--tree", default=str(ROOT), help="checkout whose app --memory measures")
    p.add_argument("--load", type=int, metavar="N", help="only the load test: N concurrent requests to a served app")
    p.add_argument("--bundle", default=str(ROOT / "app" / "bundle"), help="the model the load test serves")
    p.add_argument("--sample", default="shapes_000269.jpg", help="the file in app/examples every user sends")
    args = p.parse_args()
    if args.load:
        load_test(args.load, Path(args.bundle), ROOT / "app" / "examples" / args.sample)
        return
    if args.memory:
        print(upload_memory(Path(args.tree)))
    size = args.size
    torch.manual_seed(0)
    cfg = Config()
    model = YOLOv3(num_classes=20, width=1.0).eval()
    tmp = Path(tempfile.mkdtemp())
    loaded, status = webapp.load_source(write_bundle(model, cfg, tmp / "bundle"))
    assert loaded is not None, status
    photo = sorted((ROOT / "app" / "examples").glob("*.jpg"))[0]
    phone = tmp / "phone.jpg"  # a 12-megapixel photo, downscaled to 2048 before anything else
    Image.open(photo).convert("RGB").resize((4000, 3000)).save(phone, quality=90)

    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        t_forward = timed(lambda: model(x), args.repeats)
        t_fused = timed(lambda: loaded.model(x.contiguous(memory_format=torch.channels_last)), args.repeats)

    # An untrained model's scores all sit near 0.025: pick the threshold that keeps 10 detections,
    # so drawing and the table cost what they cost on a real photo, and 5 CAMs have 5 detections.
    upload = webapp.read_upload(photo)
    x_in, meta = webapp.to_input(upload.image, size)
    with torch.no_grad():
        dets = detect(loaded.model(x_in), size, 0.0, 0.45, letterbox=[meta])[0]
    conf = float(dets[9, 4]) - 1e-7

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"full model (width 1.0, {sum(p.numel() for p in model.parameters()):,} parameters) at {size}; "
          f"median of {args.repeats}")
    print(f"  one forward pass (plain model, batch 1)          {t_forward:7.3f} s   1.00x")
    print(f"  one forward pass (BatchNorm folded, as the app)  {t_fused:7.3f} s   {t_fused / t_forward:.2f}x")
    rows = []
    for name, path in (("640x427 photo", photo), ("4000x3000 photo", phone)):
        t_boxes = timed(lambda p=path: webapp.predict(loaded, str(p), conf, 0.45, size, "Grad-CAM", 0), args.repeats)
        r = webapp.predict(loaded, str(path), conf, 0.45, size, "Grad-CAM", 5)
        assert len(r.cams) == 5, r.message
        t_cams = timed(lambda p=path: webapp.predict(loaded, str(p), conf, 0.45, size, "Grad-CAM", 5), args.repeats)
        t_eigen = timed(lambda p=path: webapp.predict(loaded, str(p), conf, 0.45, size, "EigenCAM", 5), args.repeats)
        rows.append((name, t_boxes, t_cams, t_eigen, len(r.rows)))
    for name, t_boxes, t_cams, t_eigen, n in rows:
        print(f"  {name}: upload -> boxes ({n} detections)        {t_boxes:7.3f} s   {t_boxes / t_forward:.2f}x")
        print(f"  {name}: upload -> boxes + 5 Grad-CAMs            {t_cams:7.3f} s   {t_cams / t_forward:.2f}x")
        print(f"  {name}: upload -> boxes + 5 EigenCAMs            {t_eigen:7.3f} s   {t_eigen / t_forward:.2f}x")

    if args.served:
        from gradio_client import Client, handle_file

        demo = webapp.build_demo(tmp / "bundle", None)
        webapp.serve(demo, "127.0.0.1", 7931, block=False)
        try:
            client = Client("http://127.0.0.1:7931/", verbose=False)

            def call(top_k):
                return client.predict(handle_file(str(photo)), conf, 0.45, size, "Grad-CAM", top_k, api_name="/predict")

            t_served = timed(lambda: call(0), args.repeats)
            t_served_cams = timed(lambda: call(5), args.repeats)
        finally:
            demo.close()
        print(f"  served round trip (gradio_client, 640x427): boxes {t_served:.3f} s "
              f"({t_served / t_forward:.2f}x), boxes + 5 Grad-CAMs {t_served_cams:.3f} s "
              f"({t_served_cams / t_forward:.2f}x)")


if __name__ == "__main__":
    main()
