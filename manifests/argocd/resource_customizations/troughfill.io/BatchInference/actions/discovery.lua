-- Actions on a BatchInference: suspend, resume and cancel (in place: the job stays, cancelled).
local actions = {}
local phase = nil
if obj.status ~= nil then
  phase = obj.status.phase
end
local ended = phase == "completed" or phase == "failed" or phase == "expired" or phase == "cancelled"
  or phase == "cancelling"
local suspended = obj.spec ~= nil and obj.spec.suspend == true
local cancelled = obj.spec ~= nil and obj.spec.cancel == true
actions["suspend"] = {["disabled"] = ended or cancelled or suspended}
actions["resume"] = {["disabled"] = ended or cancelled or not suspended}
actions["cancel"] = {["disabled"] = ended or cancelled}
return actions
