/* The floor of an Envoy dynamic-module HTTP filter for `make bench` (system F): every hook Envoy
 * requires (source/extensions/filters/http/dynamic_modules/filter_config.cc) returns at once,
 * nothing is read or called back. Arguments are ignored (the System V x86-64 and AArch64 calling
 * conventions let a callee declare fewer parameters than its caller passes). */
static char config_token, filter_token;

const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

const void *envoy_dynamic_module_on_http_filter_config_new(void) { return &config_token; }
void envoy_dynamic_module_on_http_filter_config_destroy(void) {}
const void *envoy_dynamic_module_on_http_filter_per_route_config_new(void) { return 0; }
void envoy_dynamic_module_on_http_filter_per_route_config_destroy(void) {}
void *envoy_dynamic_module_on_http_filter_new(void) { return &filter_token; }
unsigned envoy_dynamic_module_on_http_filter_request_headers(void) { return 0; }
unsigned envoy_dynamic_module_on_http_filter_request_body(void) { return 0; }
unsigned envoy_dynamic_module_on_http_filter_request_trailers(void) { return 0; }
unsigned envoy_dynamic_module_on_http_filter_response_headers(void) { return 0; }
unsigned envoy_dynamic_module_on_http_filter_response_body(void) { return 0; }
unsigned envoy_dynamic_module_on_http_filter_response_trailers(void) { return 0; }
void envoy_dynamic_module_on_http_filter_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_destroy(void) {}
void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
void envoy_dynamic_module_on_http_filter_scheduled(void) {}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void) {}
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void) {}
