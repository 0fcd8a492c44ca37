"""Fault injection for the Ray fault tests, installed in every Ray worker by Ray's own
``worker_process_setup_hook`` (see ``run_with_faults``). Nothing here is imported by the package.

- ``RP_TEST_POISON``: bytes; a worker whose decoder is handed an input containing them dies at once
  (``os._exit``), as a native decoder crash or an out-of-memory kill would end it.
- ``RP_TEST_DEVICE_FAULT_FLAG``: a file path; the first process to run diffusion on a chunk writes its pid
  there and from then on raises a CUDA illegal-address error on every chunk (its device is broken);
  every other process, such as the restarted actor, works.
"""

from __future__ import annotations

import json
import os
import sys


def install() -> None:
    from rp_distributed import io

    poison = os.environ.get("RP_TEST_POISON", "").encode()
    if poison:
        decode = io.decode_image

        def crashing_decode(data: bytes, max_pixels: int):
            if poison in data:
                os._exit(139)  # what a segfault in a native decoder looks like to Ray
            return decode(data, max_pixels)

        io.decode_image = crashing_decode

    flag = os.environ.get("RP_TEST_DEVICE_FAULT_FLAG")
    if flag:
        from rp_distributed.anonymizer.ladder import ReversePersonalization

        generate = ReversePersonalization._invert_generate

        def faulty_generate(self, chunk, *args):
            # The first process to get here breaks its "device" for good: every later call in that process
            # fails too, as after a real illegal-address error. Other processes (a restarted actor) work.
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                broken = True
            except FileExistsError:
                with open(flag) as f:
                    broken = f.read() == str(os.getpid())
            if broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                                   "CUDA kernel errors might be asynchronously reported at some other API call")
            return generate(self, chunk, *args)

        ReversePersonalization._invert_generate = faulty_generate


def run_with_faults(config_json: str, input_uri: str, output_uri: str) -> None:
    """Driver: a local Ray whose workers run ``install`` first, then the real job; prints the result."""
    import ray

    from rp_distributed.config import JobConfig
    from rp_distributed.job.run import run_job

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.faults.install"})
    cfg = JobConfig.model_validate(json.loads(config_json))
    result = run_job(cfg, input_uri, output_uri, progress=False)
    print("RESULT " + json.dumps({"isolated": result.isolated, "summary": result.summary}))


if __name__ == "__main__":
    run_with_faults(*sys.argv[1:4])
