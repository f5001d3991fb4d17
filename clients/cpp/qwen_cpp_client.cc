// qwen_cpp_client: streams one generation from qwen-serve using C++ stubs generated from
// proto/qwen_serve/v1/generate.proto (`make -C clients cpp`).
//
//   qwen_cpp_client TARGET PROMPT [MAX_TOKENS] [SEED]
//
// Prints the text deltas to stdout as they arrive and one summary line to stderr. Greedy unless SEED is
// given (then temperature 1 with that seed). Exit 0 on a finished stream, 1 with the gRPC status otherwise.
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "qwen_serve/v1/generate.grpc.pb.h"

namespace v1 = qwen_serve::v1;

namespace {

v1::GenerateRequest BuildRequest(const std::string& prompt, uint32_t max_tokens, const char* seed) {
  v1::GenerateRequest request;
  request.set_prompt(prompt);
  request.mutable_stopping()->set_max_tokens(max_tokens);
  if (seed != nullptr) {
    request.mutable_sampling()->set_temperature(1.0f);
    request.mutable_sampling()->set_seed(std::strtoull(seed, nullptr, 10));
  } else {
    request.mutable_sampling()->set_temperature(0.0f);  // proto3 optional: explicit 0 = greedy
  }
  return request;
}

int StreamGeneration(v1::QwenServe::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader(stub.Generate(&context, request));
  v1::GenerateResponse response;
  v1::Finished finished;
  while (reader->Read(&response)) {
    if (response.has_token()) {
      std::cout << response.token().text() << std::flush;
    } else if (response.has_finished()) {
      finished = response.finished();
    }
  }
  grpc::Status status = reader->Finish();
  std::cout << std::endl;
  if (!status.ok()) {
    std::cerr << "error: " << status.error_code() << ": " << status.error_message() << std::endl;
    return 1;
  }
  std::cerr << "[" << v1::FinishReason_Name(finished.reason()) << ": " << finished.usage().prompt_tokens()
            << " prompt + " << finished.usage().completion_tokens() << " generated tokens]" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 5) {
    std::cerr << "usage: qwen_cpp_client TARGET PROMPT [MAX_TOKENS] [SEED]" << std::endl;
    return 2;
  }
  const uint32_t max_tokens = argc >= 4 ? static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10)) : 64;
  auto channel = grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials());
  auto stub = v1::QwenServe::NewStub(channel);
  return StreamGeneration(*stub, BuildRequest(argv[2], max_tokens, argc == 5 ? argv[4] : nullptr));
}
