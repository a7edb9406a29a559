// dynamo-generate: stream one generation from a dynamo-grpc router (RouterService.Generate).
//
// The answer goes to stdout as it streams, then a newline; the completion's finish reason and usage go
// to stderr. --cancel-after N sends the in-band cancel once N tokens have arrived.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/grpcpp.h>

#include "dynamo_grpc/v1/router.grpc.pb.h"

namespace {

namespace v1 = dynamo_grpc::v1;
using Clock = std::chrono::system_clock;

// How long past the request's deadline the call itself may last, for a router that never answers.
constexpr std::chrono::seconds kDeadlineGrace{1};

constexpr const char* kUsage = R"(usage: dynamo-generate [options] PROMPT
  --router HOST:PORT   router endpoint (127.0.0.1:50051)
  --model NAME         model name (tiny-llama)
  --max-tokens N       tokens to generate (32)
  --temperature T      sampling temperature, 0 = greedy (0)
  --ignore-eos         keep generating past the end-of-sequence token
  --request-id ID      request id (the router assigns one when empty)
  --cancel-after N     send a cancel once N tokens have arrived (0 = never)
  --timeout-s S        the request's deadline in seconds (0 = none)
  --token-ids          also print the generated token ids on stderr
)";

struct Options {
  std::string router = "127.0.0.1:50051";
  std::string model = "tiny-llama";
  std::string prompt;
  std::string request_id;
  uint32_t max_tokens = 32;
  float temperature = 0;
  bool ignore_eos = false;
  uint32_t cancel_after = 0;
  double timeout_s = 0;
  bool token_ids = false;
};

[[noreturn]] void Usage() {
  std::cerr << kUsage;
  std::exit(2);
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  std::map<std::string, std::string*> strings = {
      {"--router", &o.router}, {"--model", &o.model}, {"--request-id", &o.request_id}};
  std::vector<std::string> positionals;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    auto needs_value = [&]() -> const std::string& {
      if (i + 1 >= argc) Usage();
      return value = argv[++i];
    };
    try {
      if (strings.count(arg)) {
        *strings[arg] = needs_value();
      } else if (arg == "--max-tokens") {
        o.max_tokens = std::stoul(needs_value());
      } else if (arg == "--temperature") {
        o.temperature = std::stof(needs_value());
      } else if (arg == "--cancel-after") {
        o.cancel_after = std::stoul(needs_value());
      } else if (arg == "--timeout-s") {
        o.timeout_s = std::stod(needs_value());
      } else if (arg == "--ignore-eos") {
        o.ignore_eos = true;
      } else if (arg == "--token-ids") {
        o.token_ids = true;
      } else if (arg.rfind("--", 0) == 0) {
        Usage();
      } else {
        positionals.push_back(arg);
      }
    } catch (const std::logic_error&) {  // std::sto* on a value that is not a number
      Usage();
    }
  }
  if (positionals.size() != 1) Usage();
  o.prompt = positionals[0];
  return o;
}

v1::GenerateRequest StartRequest(const Options& o, std::optional<Clock::time_point> deadline) {
  v1::GenerateRequest request;
  request.set_request_id(o.request_id);
  v1::GenerationParams* params = request.mutable_start();
  params->set_model(o.model);
  params->mutable_prompt()->set_text(o.prompt);
  params->mutable_sampling()->set_max_tokens(o.max_tokens);
  params->mutable_sampling()->set_temperature(o.temperature);
  params->mutable_sampling()->set_ignore_eos(o.ignore_eos);
  if (deadline) {
    auto since_epoch = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline->time_since_epoch());
    params->mutable_deadline()->set_seconds(since_epoch.count() / 1000000000);
    params->mutable_deadline()->set_nanos(since_epoch.count() % 1000000000);
  }
  return request;
}

v1::GenerateRequest CancelRequest(const std::string& request_id) {
  v1::GenerateRequest request;
  request.set_request_id(request_id);
  request.mutable_cancel()->set_reason("client cancel");
  return request;
}

// google.rpc.ErrorInfo's reason from the status details (a serialized google.rpc.Status), read off the
// wire: Status.details (3) holds Any messages (type_url 1, value 2), ErrorInfo.reason is field 1.
std::string ErrorInfoReason(const std::string& status_details) {
  google::protobuf::UnknownFieldSet status;
  if (!status.ParseFromString(status_details)) return "";
  for (int i = 0; i < status.field_count(); ++i) {
    const auto& detail = status.field(i);
    if (detail.number() != 3 || detail.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      continue;
    }
    google::protobuf::UnknownFieldSet any;
    if (!any.ParseFromString(detail.length_delimited())) continue;
    std::string type_url, value;
    for (int j = 0; j < any.field_count(); ++j) {
      const auto& field = any.field(j);
      if (field.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
      if (field.number() == 1) type_url = field.length_delimited();
      if (field.number() == 2) value = field.length_delimited();
    }
    if (type_url != "type.googleapis.com/google.rpc.ErrorInfo") continue;
    google::protobuf::UnknownFieldSet info;
    if (!info.ParseFromString(value)) continue;
    for (int j = 0; j < info.field_count(); ++j) {
      const auto& field = info.field(j);
      if (field.number() == 1 && field.type() == google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
        return field.length_delimited();
      }
    }
  }
  return "";
}

// The status code as the gRPC spec spells it.
const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
      "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int index = static_cast<int>(code);
  return index >= 0 && index < 17 ? kNames[index] : "UNKNOWN";
}

// A failed call in one line, `CODE REASON: message`, REASON being the ErrorInfo the server sent (left out
// when it only repeats the code).
std::string Describe(const grpc::Status& status) {
  std::string code = CodeName(status.error_code());
  std::string reason = ErrorInfoReason(status.error_details());
  return code + (reason.empty() || reason == code ? "" : " " + reason) + ": " + status.error_message();
}

// Runs one request, printing text (and token ids) as they arrive. With a timeout the request carries its
// deadline, so the router ends it with DEADLINE_EXCEEDED and its reason; the call's own deadline, a grace
// period later, bounds the wait for a router that never answers.
int Generate(v1::RouterService::Stub& stub, const Options& o) {
  grpc::ClientContext context;
  std::optional<Clock::time_point> deadline;
  if (o.timeout_s > 0) {
    auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.timeout_s));
    deadline = Clock::now() + timeout;
    context.set_deadline(*deadline + kDeadlineGrace);
  }
  auto stream = stub.Generate(&context);
  // The send side stays open: a later message on it is the cancel.
  bool writing = stream->Write(StartRequest(o, deadline));
  std::vector<uint32_t> ids;
  std::optional<v1::Completion> completion;
  bool printed = false;
  v1::GenerateResponse response;
  while (!completion && stream->Read(&response)) {
    if (response.has_completion()) {
      completion = response.completion();
      break;
    }
    std::cout << response.tokens().text() << std::flush;
    printed = true;
    ids.insert(ids.end(), response.tokens().token_ids().begin(), response.tokens().token_ids().end());
    if (writing && o.cancel_after > 0 && ids.size() >= o.cancel_after) {
      stream->Write(CancelRequest(response.request_id()));
      writing = false;
      stream->WritesDone();
    }
  }
  if (writing) stream->WritesDone();
  grpc::Status status = stream->Finish();
  if (completion || printed) std::cout << std::endl;
  if (!status.ok()) {
    std::cerr << "dynamo-generate: " << Describe(status) << std::endl;
    return 1;
  }
  if (!completion) {
    std::cerr << "dynamo-generate: the router closed the stream without a completion" << std::endl;
    return 1;
  }
  if (o.token_ids) {
    std::cerr << "token ids:";
    for (uint32_t id : ids) std::cerr << " " << id;
    std::cerr << std::endl;
  }
  const v1::Usage& usage = completion->usage();
  std::cerr << "[" << usage.prompt_tokens() << " prompt + " << usage.completion_tokens()
            << " completion tokens, finish: " << v1::FinishReason_Name(completion->finish_reason()) << "]"
            << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = ParseOptions(argc, argv);
  auto channel = grpc::CreateChannel(options.router, grpc::InsecureChannelCredentials());
  auto stub = v1::RouterService::NewStub(channel);
  return Generate(*stub, options);
}
