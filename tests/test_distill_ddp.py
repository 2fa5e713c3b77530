"""torchrun --nproc_per_node 2 (gloo, CPU) trains like one process on the whole batch."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_distill_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    import ddp_distill_script  # the single-process reference runs here: one interpreter start fewer
    threads = torch.get_num_threads()
    try:
        ddp_distill_script.main(str(tmp_path / "one.json"))
    finally:
        torch.set_num_threads(threads)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                              "--master_port", str(_free_port()), str(SCRIPT), str(tmp_path / "two.json")],
                   check=True, timeout=300)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["world"] == 1 and two["world"] == 2
    torch.testing.assert_close(torch.tensor(two["loss_curve"]), torch.tensor(one["loss_curve"]), rtol=1e-4, atol=1e-5)
    for n in one["weights"]:
        torch.testing.assert_close(torch.tensor(two["weights"][n]), torch.tensor(one["weights"][n]),
                                   rtol=1e-4, atol=1e-5, msg=n)
