"""dlib model conversion: the .dat reader, the ResNet/MMOD/shape-predictor converters and ONNX builders."""
