"""One module per command: its argument classes, its checks and `main(argv)`. `paddlellm.cli` and the
top-level scripts call them; commands do not import each other (what two need lives in a lower layer)."""
