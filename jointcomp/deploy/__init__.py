"""Exports of a .jcz file for runtimes: portable C for microcontrollers (`c`), ONNX (`onnx`)."""
