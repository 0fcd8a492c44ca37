"""Entry point for ``ray job submit``: the same job as ``rp-anonymize run``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/anonymize.py s3://bucket/in s3://bucket/out --config configs/sdxl.yaml

Inside a Ray job RAY_ADDRESS is set, so the pipeline joins the cluster instead of starting one.
"""

import sys

from rp_distributed.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
