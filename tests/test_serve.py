"""`shardwise serve` as a client sees it: over HTTPS with a self-signed certificate (httpx,
trusting only that certificate), bearer tokens, bad inputs that leave the server serving,
concurrent clients batched together; predictions equal `shardwise predict` in one process."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cli_fork
import httpx
import numpy as np
import pytest

TOKEN = "tok-" + "7" * 28
ROOT = Path(__file__).resolve().parents[1]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as `openssl req -x509` would make."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "run"
    done = cli_fork.run(["train", "--nproc", "1", "--model.name", "mlp", "--model.hidden", "32", "--train.steps", "60",
                         "--run.progress", "false", "--out", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def server(run_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder)
    (folder / "tokens").write_text(f"{TOKEN}\nanother-token-0123456789\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardwise", "serve", str(run_folder), "--serve.port", "0", "--serve.tls_cert",
         str(cert), "--serve.tls_key", str(key), "--serve.token_file", str(folder / "tokens"),
         "--serve.max_wait_ms", "20", "--serve.max_body_bytes", "300000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    line = proc.stdout.readline()
    found = re.search(r"on (https://127\.0\.0\.1:\d+)/", line)
    assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
    client = httpx.Client(base_url=found.group(1), verify=ssl.create_default_context(cafile=str(cert)), timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    yield client, proc
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read().strip().endswith("shardwise serve: stopped")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits().data[:40].reshape(-1, 1, 8, 8)  # raw 0..16 intensities, as the source reads them


def _predicted_in_one_process(run_folder, inputs, tmp_path) -> dict:
    out = tmp_path / f"pred-{len(list(tmp_path.iterdir()))}.npz"
    done = cli_fork.run(["predict", str(run_folder), "--input", str(inputs), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    with np.load(out) as found:
        return {"probabilities": found["probabilities"], "classes": found["classes"].tolist()}


def test_predictions_are_one_processes_over_https(server, run_folder, digits, tmp_path):
    client, _ = server
    np.savez(tmp_path / "x.npz", x=digits)
    want = _predicted_in_one_process(run_folder, tmp_path / "x.npz", tmp_path)
    got = client.post("/v1/predict", json={"inputs": digits.tolist()})
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(np.asarray(got.json()["probabilities"]), want["probabilities"], rtol=1e-5, atol=1e-7)
    assert got.json()["labels"] == [want["classes"][i] for i in want["probabilities"].argmax(axis=1)]


def test_images_are_read_as_predict_reads_an_image_folder(server, run_folder, digits, tmp_path):
    from PIL import Image

    client, _ = server
    (tmp_path / "images").mkdir()
    encoded = []
    for i, sample in enumerate(digits[:5]):
        image = Image.fromarray((sample[0] * 255 / 16).astype(np.uint8)).resize((32, 32))
        image.save(tmp_path / "images" / f"{i}.png")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    want = _predicted_in_one_process(run_folder, tmp_path / "images", tmp_path)
    got = client.post("/v1/predict", json={"images": encoded})
    np.testing.assert_allclose(np.asarray(got.json()["probabilities"]), want["probabilities"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789abc"},
                                     {"Authorization": TOKEN}], ids=["none", "wrong", "not-bearer"])  # fmt: skip
def test_a_request_without_a_valid_token_is_refused(server, headers):
    client, _ = server
    for method, path in (("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/metrics")):
        got = client.request(method, path, headers={"Authorization": "", **headers})
        assert got.status_code == 401 and got.json() == {"error": "a valid bearer token is required"}
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_plain_http_to_the_https_server_gets_no_answer(server):
    client, _ = server
    with pytest.raises(httpx.HTTPError):
        httpx.get(str(client.base_url).replace("https", "http") + "/healthz", timeout=5)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "the body is not JSON"),
    (json.dumps({"inputs": [[1, 2, 3]]}).encode(), 422, '"inputs" has shape [1, 3]; a sample of this model is'),
    (json.dumps({"inputs": [[["a"] * 8] * 8]}).encode(), 422, '"inputs" must be nested arrays of numbers'),
    (json.dumps({"inputs": [[[float("nan")] * 8] * 8]}).encode(), 422, '"inputs" holds a value that is not a finite'),
    (b'{"inputs": [[[1' + b"0" * 400 + b"]]]}", 422, '"inputs" must be nested arrays of numbers'),
    (json.dumps({"images": ["bm90IGFuIGltYWdl"]}).encode(), 422, "images[0] is not a base64-encoded image file"),
    (json.dumps({"what": 1}).encode(), 400, 'expected a JSON object with one of "inputs"'),
    (b"[" + b"0," * 200_000 + b"0]", 413, "the body has 400003 bytes, over the limit of 300000"),
], ids=["malformed", "shape", "type", "nan", "huge-number", "image", "keys", "too-large"])  # fmt: skip
def test_bad_input_is_a_4xx_of_one_line_and_the_server_goes_on(server, digits, body, status, message):
    client, proc = server
    got = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert got.status_code == status and list(got.json()) == ["error"], got.text
    assert got.json()["error"].startswith(message) and "\n" not in got.json()["error"]
    assert client.post("/v1/predict", json={"inputs": digits[:1].tolist()}).status_code == 200
    assert proc.poll() is None


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server, digits):
    client, _ = server
    alone = np.asarray(client.post("/v1/predict", json={"inputs": digits.tolist()}).json()["probabilities"])
    before = _forward_passes(client)
    answers = [None] * 40

    def ask(i):
        answers[i] = client.post("/v1/predict", json={"inputs": digits[i : i + 1].tolist()}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, a in enumerate(answers):
        np.testing.assert_allclose(a["probabilities"][0], alone[i], rtol=1e-5, atol=1e-7)
    passes = _forward_passes(client) - before
    assert passes < 30, passes  # 40 requests in fewer forward passes: batched


def _forward_passes(client) -> int:
    text = client.get("/metrics").text
    return int(float(re.search(r"^shardwise_batch_samples_count (\S+)$", text, re.M).group(1)))


def test_an_unknown_path_or_method_is_one_line_of_json_too(server):
    client, _ = server
    assert client.get("/v2/predict").json() == {"error": "GET /v2/predict: Not Found"}
    got = client.get("/v1/predict")
    assert got.status_code == 405 and got.json() == {"error": "GET /v1/predict: Method Not Allowed"}


def test_the_model_and_the_page_are_described(server, run_folder):
    client, _ = server
    about = client.get("/v1/model").json()
    assert about["input_shape"] == [1, 8, 8] and about["classes"] == [str(i) for i in range(10)]
    summary = json.loads((run_folder / "summary.json").read_text())
    assert about["val_accuracy"] == summary["val_accuracy"] and about["max_batch"] == 32
    page = client.get("/", headers={"Authorization": ""}).text
    assert "<canvas" in page and "v1/predict" in page


def test_listening_beyond_loopback_without_tls_and_tokens_is_refused(run_folder):
    done = cli_fork.run(["serve", str(run_folder), "--serve.host", "0.0.0.0", "--serve.port", "0"])
    assert done.returncode == 2
    assert done.stderr.strip() == ("shardwise: serve.host: 0.0.0.0 is not loopback: serving beyond this machine "
                                   "needs serve.tls_cert, serve.tls_key and serve.token_file")  # fmt: skip


def test_a_training_schedule_named_for_serving_is_refused(run_folder):
    args = ["serve", str(run_folder), "--nproc", "2", "--parallel.pp", "2", "--parallel.schedule", "zbv"]
    done = cli_fork.run([*args, "--serve.port", "0"])
    assert done.returncode == 2
    assert done.stderr.strip() == ("shardwise: parallel.schedule: is a training schedule: a served pipeline runs a "
                                   "batch a stage, one stage a rank (leave parallel.schedule and "
                                   "parallel.virtual_stages out)")  # fmt: skip


def test_sigterm_answers_the_requests_in_flight_then_exits(run_folder, digits):
    """Plain HTTP on loopback (no TLS, no token); a request waits in a batch for up to 1.5 s
    when SIGTERM comes: it is answered, then the server exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(run_folder), "--serve.port", "0",
                             "--serve.max_wait_ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    line = proc.stdout.readline()
    assert "(no TLS, no token: loopback only)" in line, line
    url = re.search(r"(http://127\.0\.0\.1:\d+)/", line).group(1)
    answer = {}
    asking = threading.Thread(
        target=lambda: answer.update(
            r=httpx.post(f"{url}/v1/predict", timeout=30, json={"inputs": digits[:2].tolist()})
        )
    )
    asking.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    asking.join()
    assert answer["r"].status_code == 200 and len(answer["r"].json()["labels"]) == 2
    assert proc.wait(timeout=30) == 0
    assert proc.stderr.read().strip().endswith("shardwise serve: stopped")


def test_the_page_in_a_headless_browser_predicts_a_chosen_image(server, run_folder, digits, tmp_path):
    """Debian's chromium, driven by Selenium through Debian's chromedriver (nothing
    downloaded): the page, the token typed in, an image file chosen, the label shown is the
    one `shardwise predict` gives that image."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = server
    (tmp_path / "one").mkdir()
    Image.fromarray((digits[3, 0] * 255 / 16).astype(np.uint8)).resize((64, 64)).save(tmp_path / "one" / "d.png")
    want = _predicted_in_one_process(run_folder, tmp_path / "one", tmp_path)
    label = want["classes"][int(want["probabilities"][0].argmax())]
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # its profile and the sockets it leaves in TMPDIR, removed after (a short path: a socket's
    # path must fit 107 bytes)
    own = Path(tempfile.mkdtemp(prefix="sw-browser-"))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--ignore-certificate-errors",
                 "--disable-gpu", f"--user-data-dir={own / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    service = Service("/usr/bin/chromedriver", env={**os.environ, "TMPDIR": str(own)})
    browser = webdriver.Chrome(options=options, service=service)
    try:
        wait = WebDriverWait(browser, 20)
        browser.get(f"{client.base_url}/")
        wait.until(lambda b: "token" in b.find_element(By.ID, "about").text)  # asked without one: refused
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\t")
        wait.until(lambda b: "validation accuracy" in b.find_element(By.ID, "about").text)
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "one" / "d.png"))
        wait.until(lambda b: b.find_element(By.ID, "status").text == "image loaded")
        browser.find_element(By.ID, "predict").click()
        wait.until(lambda b: b.find_element(By.ID, "label").text != "-")
        assert browser.find_element(By.ID, "label").text == label
        assert len(browser.find_elements(By.CSS_SELECTOR, "#probs tr")) == 10
    finally:
        browser.quit()
        shutil.rmtree(own, ignore_errors=True)


def test_the_servers_connections_send_without_delay():
    """TCP_NODELAY on every accepted connection: asyncio sets it only on a socket that says
    it is TCP, and without it a keep-alive client's request waits on delayed ACKs."""
    import asyncio
    import socket

    from shardwise.serve.front import listen

    async def check() -> int:
        sock = listen("127.0.0.1", 0)
        seen = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        return seen[0]

    assert asyncio.run(check()) != 0
