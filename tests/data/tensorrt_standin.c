/* Stand-ins for the nine functions the TensorRT Python bindings import from libnvinfer,
   libnvinfer_plugin and libnvonnxparser. Those libraries come only from NVIDIA's package index;
   with these, the real pinned bindings load on a machine without them, so their classes and
   enums can be listed. Every stand-in returns NULL or 0: nothing can be built or run with it. */
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *namespace_) { return 0; }
