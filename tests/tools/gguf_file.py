"""What the test tools' GGUF writers share: writing a gguf-py GGUFWriter's file out."""
import gguf


def write(w: gguf.GGUFWriter) -> None:
    """Writes `w`'s header, metadata and tensors, in the order GGUF lays them out, and closes it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
