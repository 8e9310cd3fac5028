"""Export a model as a static-graph step program: python export_model.py [ARGS.json] --model_name_or_path DIR --output_path OUT [--key value ...] (--help lists the arguments)."""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("export", sys.argv[1:]))
